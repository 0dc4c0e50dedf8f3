"""Planning: from a job spec, the free workers and their measured links to a plan.

Pure computation over `opdag` graphs and `compressors` policies; nothing here talks to the
network or the store, so the CLI may import it without starting the service. The modules
in pipeline order, from what a plan is made of to the plan (each uses only those above):

- `jobspec`: the job spec, parsed and validated;
- `links`: the measured bandwidth matrix;
- `plan`: the free workers (`WorkerSlot`) and the `Plan` the coordinator stores and hands
  out, with the `even` cut;
- `compute`: the compute model (FLOPs to seconds per worker) and its refit;
- `workload`: what each stage computes and each pair of stages exchanges, and
  `BlockChain`, the model as the search cuts it;
- `simulator`: the event simulation of the workers' schedule (`opdag.schedule`);
- `estimator`: a placed workload's predicted step, from the three models;
- `islands`, `coarsening`: OP-Fence's worker islands and the blocks it cuts along;
- `scoring`, `pipeline_dp`, `local_search`: the search - simulated and proxy scores, the
  dynamic programme that proposes plans, the local moves that improve them;
- `opfence_plan`: the plan found, as data, with its explanation;
- `opfence`: the OP-Fence planner and the `even` baseline, from a graph to a plan;
- `link_compression`: the per-link compression the estimator prices, from the spec;
- `planner`: a `PlanRequest` turned into a `Plan`.
"""
