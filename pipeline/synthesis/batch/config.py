"""How a teacher in ``mode: batch`` packs, submits and waits for its batches (``teacher.batch``).

Nothing here changes the data (the same requests reach the same model), so every field is
volatile for the config digest. The defaults follow the OpenAI Batch API's published limits
(50,000 requests and 200 MB per input file, a 24 h completion window), which the providers
that speak the same protocol (Gemini's OpenAI-compatible endpoint, Together, Groq) share or
exceed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchConfig:
    """Limits, polling and retries of the batch mode of one teacher."""

    completion_window: str = field(default="24h", metadata={"volatile": True, "help":
        "The batch's completion window sent to POST /v1/batches (OpenAI accepts only 24h)."})
    max_requests_per_file: int = field(default=50_000, metadata={"volatile": True, "help":
        "A batch input file holds at most this many requests (OpenAI: 50,000)."})
    max_file_bytes: int = field(default=190_000_000, metadata={"volatile": True, "help":
        "A batch input file is at most this many bytes, base64 images included (OpenAI: 200 MB; "
        "the default leaves headroom). A 413 from the provider halves the file and lowers this "
        "for the rest of the run."})
    max_enqueued_tokens: int | None = field(default=None, metadata={"volatile": True, "help":
        "Estimated tokens (prompt estimate + max_tokens per request) one file may carry, and "
        "that this run's batches of this teacher may have queued at once: the provider's "
        "enqueued-token limit of your tier. null = no limit."})
    max_attempts: int = field(default=3, metadata={"volatile": True, "help":
        "Times a request is put in a batch: lines that failed or never ran (expired, cancelled, "
        "missing) are resubmitted until then, and are named rejects after it."})
    poll_initial_s: float = field(default=10.0, metadata={"volatile": True, "help":
        "First wait between two status checks of a batch; doubles while nothing changes."})
    poll_max_s: float = field(default=300.0, metadata={"volatile": True, "help":
        "Longest wait between two status checks, and the wait after token_limit_exceeded."})
    recover_scan: int = field(default=1000, metadata={"volatile": True, "help":
        "When the run's batch state is empty (a fresh run, or a lost store), this many of the "
        "account's newest batches are listed to find this stage's batches by their metadata."})
    keep_files: bool = field(default=False, metadata={"volatile": True, "help":
        "Keep each batch's input, output and error JSONL under <store>/batches after it is "
        "collected (default: deleted once its results are in the request cache)."})

    def __post_init__(self):
        for name in ("max_requests_per_file", "max_file_bytes", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_enqueued_tokens is not None and self.max_enqueued_tokens < 1:
            raise ValueError(f"max_enqueued_tokens: must be >= 1 or null, got {self.max_enqueued_tokens}")
        if not 0 < self.poll_initial_s <= self.poll_max_s:
            raise ValueError(f"poll_initial_s: must be > 0 and <= poll_max_s ({self.poll_max_s}), "
                             f"got {self.poll_initial_s}")
        if self.recover_scan < 0:
            raise ValueError(f"recover_scan: must be >= 0, got {self.recover_scan}")
