"""The one small interface every explanation backend speaks.

A backend turns a list of rendered prompts into a list of Generations, one per
prompt, in order. Transport failures it could not recover from come back as a
Generation with `error` set (a short reason such as "timeout" or "http_503");
a misconfiguration that would fail every prompt raises BackendError instead.
"""
import dataclasses
from typing import Protocol

from entityclip_jax.errors import EntityClipError


class BackendError(EntityClipError):
    """The backend cannot work at all (bad URL, bad key, unknown model): stop the run."""


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str = ""
    tokens: int = 0          # generated tokens (as counted by the model or server)
    truncated: bool = False  # stopped by the max_new_tokens cap
    error: str | None = None


class Backend(Protocol):
    name: str         # "openai-http" or "transformers"
    model: str        # part of the cache key
    batch_size: int   # prompts per generate() call

    def generate(self, prompts: list[str], *, chat: bool, max_new_tokens: int,
                 stop: tuple = (), sample: bool = False) -> list[Generation]:
        """sample=False: greedy (first try); True: sampled (a retry after a degenerate answer)."""
        ...

    def cancel(self) -> None:
        """Ask in-flight work to stop soon (Ctrl-C); a no-op where it cannot."""
        ...
