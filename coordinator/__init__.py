"""The coordinator: jobs, worker registry, state store, planning and the dashboard."""
