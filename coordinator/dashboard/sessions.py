"""Who may see the dashboard: the tokens a login takes, the sessions it opens, and the
rate limit on failed logins.

A login with the operator token or the read-only dashboard token opens a session (the
volunteers' join token is refused: a volunteer sees nothing of the jobs): a random id
(the cookie's value) kept here with its expiry. The id is the only thing the browser holds;
the token never leaves the login form. Sessions live in memory only: a restarted
coordinator asks everyone to log in again, which costs an operator one form.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# A session lasts this long from its login.
SESSION_S = 12 * 3600.0
# At most this many sessions at once; a new login beyond it ends the oldest.
MAX_SESSIONS = 256
# Failed logins allowed per client address within the window, before it must wait.
FAILED_LOGINS = 5
FAILED_WINDOW_S = 60.0
# Client addresses whose failures are remembered (the oldest forgotten first).
MAX_TRACKED_CLIENTS = 4096


def tokens_match(given: str, accepted: tuple[str, ...]) -> bool:
    """Whether `given` is one of the accepted tokens, in time that does not depend on how
    much of it matches (every token is compared, whichever matches)."""
    given_b = given.encode()
    found = False
    for token in accepted:
        found |= hmac.compare_digest(given_b, token.encode())
    return found and bool(given)


@dataclass
class SessionStore:
    """The open sessions by id, bounded in number and in time."""

    lifetime_s: float = SESSION_S
    capacity: int = MAX_SESSIONS
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[str, float] = field(default_factory=dict)  # id -> expiry

    def open(self) -> str:
        """A new session's id (every session sees the same read-only pages, whichever token
        opened it)."""
        self._drop_expired()
        while len(self._sessions) >= self.capacity:
            # Dicts keep insertion order: the first is the oldest login.
            del self._sessions[next(iter(self._sessions))]
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = self.clock() + self.lifetime_s
        return session_id

    def valid(self, session_id: str | None) -> bool:
        """Whether `session_id` names an open, unexpired session."""
        if not session_id:
            return False
        expires_at = self._sessions.get(session_id)
        if expires_at is None:
            return False
        if expires_at <= self.clock():
            del self._sessions[session_id]
            return False
        return True

    def close(self, session_id: str | None) -> None:
        """End the session (logout); an unknown id changes nothing."""
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        self._drop_expired()
        return len(self._sessions)

    def _drop_expired(self) -> None:
        now = self.clock()
        for sid in [s for s, v in self._sessions.items() if v <= now]:
            del self._sessions[sid]


@dataclass
class LoginLimiter:
    """Failed logins per client address: after `allowed` failures within `window_s` the
    address is refused until the oldest of them is `window_s` old."""

    allowed: int = FAILED_LOGINS
    window_s: float = FAILED_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def blocked(self, client: str) -> float:
        """Seconds `client` must wait before it may try again (0: it may now)."""
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        now = self.clock()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        if len(failures) < self.allowed:
            return 0.0
        return failures[0] + self.window_s - now

    def failed(self, client: str) -> None:
        """Count one failed login of `client`."""
        if client not in self._failures and len(self._failures) >= MAX_TRACKED_CLIENTS:
            del self._failures[next(iter(self._failures))]
        self._failures.setdefault(client, deque()).append(self.clock())

    def succeeded(self, client: str) -> None:
        """A good login forgets the address's failures."""
        self._failures.pop(client, None)
