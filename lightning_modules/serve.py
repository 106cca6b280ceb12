"""The HTTP server of a trained model, on LitServe (Lightning's serving library).

``python cli.py serve --model RUN/dpo/hf [--port 8000] [--max_batch_size 64]
[--batch_timeout 0.01] [--devices auto]``. Requests arriving within ``batch_timeout`` of each
other are decoded one by one (bad ones answered at once with a 4xx) and then recommended in one
beam search per batch.

``POST /predict`` ``{"history": ["50", "172"], "user": "196", "k": 10}`` ->
``{"items": [{"id": "...", "title": "...", "score": -1.23}, ...]}``; ``GET /health`` -> ``ok``.
"""

# No `from __future__ import annotations` here: FastAPI reads decode_request's annotation at
# runtime to validate the request body against PredictRequest.
import argparse
import logging
import signal

import litserve as ls
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

log = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    """The body of ``POST /predict`` (validated by FastAPI: malformed JSON, a wrong type or an
    unknown field is a 422 that names the field)."""

    model_config = ConfigDict(extra="forbid")
    history: list[StrictStr | StrictInt] = Field(default_factory=list,
                                                 description="raw item ids, oldest first")
    user: StrictStr | StrictInt | None = Field(None, description="raw user id (optional)")
    k: StrictInt = Field(10, description="number of items to return")
    exclude_history: StrictBool = True


class RecommenderAPI(ls.LitAPI):
    """LitServe API over :class:`lightning_modules.recommender.Recommender`."""

    def __init__(self, model_dir: str, num_beams: int = 20, max_batch_size: int = 64,
                 batch_timeout: float = 0.01) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_dir = model_dir
        self.num_beams = num_beams

    def setup(self, device) -> None:
        from lightning_modules.recommender import Recommender

        self.rec = Recommender.from_pretrained(self.model_dir, device=device,
                                               num_beams=self.num_beams)

    def decode_request(self, request: PredictRequest) -> dict:
        """Check one request against the model; a problem is a 422 that says what was wrong
        (so the batch's beam search never sees a bad request)."""
        if not 1 <= request.k <= self.num_beams:
            raise HTTPException(422, f"'k' must be an integer from 1 to {self.num_beams}, "
                                     f"got {request.k}")
        history = [str(h) for h in request.history]
        user = None if request.user is None else str(request.user)
        try:
            self.rec.item_index(history)
            self.rec.user_index(user)
        except KeyError as err:
            raise HTTPException(422, str(err.args[0])) from None
        return {"history": history, "user": user, "k": request.k,
                "exclude_history": request.exclude_history}

    def batch(self, inputs: list[dict]) -> list[dict]:
        return list(inputs)

    def predict(self, batch) -> list[list[dict]]:
        if isinstance(batch, dict):  # max_batch_size 1: LitServe passes the request itself
            batch = [batch]
        out: list[list[dict] | None] = [None] * len(batch)
        # One beam search per setting of exclude_history (almost always one).
        for flag in (True, False):
            idx = [i for i, r in enumerate(batch) if r["exclude_history"] is flag]
            if not idx:
                continue
            k = max(batch[i]["k"] for i in idx)
            got = self.rec.recommend_batch([batch[i]["history"] for i in idx],
                                           [batch[i]["user"] for i in idx], k=k,
                                           exclude_history=flag)
            for i, items in zip(idx, got):
                out[i] = items[:batch[i]["k"]]
        return out if self.max_batch_size > 1 else out[0]

    def unbatch(self, output: list) -> list:
        return list(output)

    def encode_response(self, output: list[dict]) -> dict:
        return {"items": output}


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cli.py serve",
        description="Serve a trained model over HTTP (LitServe): POST /predict, GET /health.")
    parser.add_argument("--model", required=True,
                        help="an exported model folder (RUN/sft/hf or RUN/dpo/hf)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=64,
                        help="requests decoded together in one beam search")
    parser.add_argument("--batch_timeout", type=float, default=0.01,
                        help="seconds to wait for a batch to fill")
    parser.add_argument("--num_beams", type=int, default=20, help="beam width (k <= it)")
    parser.add_argument("--devices", default="auto", help="'auto' or a number of devices")
    parser.add_argument("--accelerator", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--workers_per_device", type=int, default=1)
    args = parser.parse_args(argv)
    from pathlib import Path

    from lightning_modules.components.prompts import CATALOG_FILE

    if not (Path(args.model) / CATALOG_FILE).exists():
        parser.error(f"{Path(args.model) / CATALOG_FILE}: not found; --model takes an exported "
                     "model folder (RUN/sft/hf or RUN/dpo/hf)")
    if args.max_batch_size < 1 or args.batch_timeout < 0 or args.num_beams < 1:
        parser.error("--max_batch_size and --num_beams must be >= 1, --batch_timeout >= 0")
    devices = args.devices if args.devices == "auto" else int(args.devices)
    api = RecommenderAPI(args.model, num_beams=args.num_beams,
                         max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.accelerator, devices=devices,
                          workers_per_device=args.workers_per_device, timeout=60)
    print(f"serving {args.model} on http://{args.host}:{args.port}  (POST /predict, GET /health)",
          flush=True)
    # SIGTERM (kill, systemd, a container stop) shuts down like Ctrl-C: LitServe then stops
    # its inference and HTTP worker processes instead of leaving them running.
    signal.signal(signal.SIGTERM, _interrupt)
    server.run(host=args.host, port=args.port, generate_client_file=False)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
