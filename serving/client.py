"""A Python client of the pijax gRPC service (`scripts/serve.py`).

One channel, the API key on every call, one deadline for every call. `generate` drains a
streaming `Generate` call into a `Completion`: the text, the token ids, when each token's
message arrived, and the final message (usage, timings, finish reason, session id).

Used by the review agent (`scripts/review_claims.py`) and the bench's remote driver
(`pijax.bench.remote`). It knows nothing of either: requests are the proto messages themselves.
"""

from __future__ import annotations

import dataclasses
import os
import time

import grpc

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.proto.pijax.v1 import inference_pb2_grpc as pb_grpc

API_KEY_ENV = "PIJAX_API_KEY"
DEV_MODE_KEY = "dev-mode"  # what a server in --insecure_dev_mode accepts from anyone


@dataclasses.dataclass
class Completion:
    """One streamed `Generate` call, collected. Times are `time.monotonic()` seconds."""

    text: str
    token_ids: list[int]
    token_times: list[float]  # one entry per token: when the message carrying it arrived
    sent: float
    done: float
    last: pb.GenerateResponse  # the final message: usage, timings, finish reason, session id

    @property
    def ttft_s(self) -> float:
        """Client-side time to the first token (the whole call when none came)."""
        return (self.token_times[0] if self.token_times else self.done) - self.sent

    @property
    def total_s(self) -> float:
        return self.done - self.sent

    @property
    def finish(self) -> str:
        """The finish reason in lower case without its prefix (`stop`, `length`, ...)."""
        return pb.FinishReason.Name(self.last.finish_reason).removeprefix("FINISH_REASON_").lower()


class InferenceClient:
    """The stub with the key and the deadline bound. `api_key` defaults to $PIJAX_API_KEY, then
    to the dev-mode placeholder. Errors are `grpc.RpcError`s, raised as they come."""

    def __init__(self, target: str, api_key: str | None = None, timeout_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self._channel)
        key = api_key or os.environ.get(API_KEY_ENV) or DEV_MODE_KEY
        self.metadata = (("authorization", f"Bearer {key}"),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(
            pb.ModelInfoRequest(), metadata=self.metadata, timeout=self.timeout_s
        )

    def register_trusted_prefix(
        self, zone: str, *, text: str | None = None, token_ids: list[int] | None = None
    ) -> None:
        """Register a zone's trusted prefix (admin keys only), as text or as token ids."""
        if (text is None) == (token_ids is None):
            raise ValueError("register_trusted_prefix takes exactly one of text or token_ids")
        request = (
            pb.RegisterTrustedPrefixRequest(zone=zone, text=text)
            if text is not None
            else pb.RegisterTrustedPrefixRequest(zone=zone, token_ids=pb.TokenIds(ids=token_ids))
        )
        self.stub.RegisterTrustedPrefix(request, metadata=self.metadata, timeout=self.timeout_s)

    def end_session(self, session_id: str) -> None:
        self.stub.EndSession(
            pb.EndSessionRequest(session_id=session_id),
            metadata=self.metadata,
            timeout=self.timeout_s,
        )

    def generate(self, request: pb.GenerateRequest) -> Completion:
        """Run one streaming `Generate` call to its end."""
        sent = time.monotonic()
        texts: list[str] = []
        ids: list[int] = []
        times: list[float] = []
        last = None
        for r in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s):
            now = time.monotonic()
            texts.append(r.text)
            ids.extend(r.token_ids)
            times.extend([now] * len(r.token_ids))
            last = r
        if last is None:
            raise RuntimeError(f"Generate {request.request_id!r} streamed no message")
        return Completion("".join(texts), ids, times, sent, time.monotonic(), last)
