"""`retinanet serve`: a small HTTP service (FastAPI + uvicorn) around a checkpoint or an
exported ONNX model.

    POST /predict   multipart upload (field `file`) or the raw image bytes -> JSON detections
    GET  /health    {"status": "ok"}
    GET  /info      the model: classes, input size, backend

Concurrent requests are batched: a worker thread takes what has queued up (up to
`max_batch` images, waiting at most `max_wait_ms` for more) and runs the images of equal size
together, so that an answer never depends on what else was being served.
"""


import asyncio
import queue
import threading
from concurrent.futures import Future
from pathlib import Path


class Predictor:
    """The model behind the service: a checkpoint (torch) or an exported `.onnx`
    (onnxruntime). `predict(images)` takes `(3, H, W)` uint8 tensors / `(H, W, 3)` arrays."""

    def __init__(self, weights: str | Path, device: str = "cpu", amp: str = "none", compile: bool = False):
        """`amp` ("none", "bf16", "fp16", resolved) and `compile` (torch.compile the network
        and NMS) apply to a checkpoint; an ONNX model runs as exported."""
        weights = Path(weights)
        if weights.suffix == ".onnx":
            from .export.ort_predict import OnnxDetector

            self.onnx = OnnxDetector(weights)
            self.class_names, self.category_ids = self.onnx.class_names, self.onnx.category_ids
            self.info = {"backend": "onnxruntime", "input": self.onnx.input}
        else:
            from .checkpoint import load_model

            self.onnx = None
            self.model = load_model(weights, map_location=device).to(device).optimize_for_inference(compile=compile)
            self.class_names, self.category_ids = self.model.class_names, self.model.category_ids
            self.device, self.amp = device, amp
            pre = self.model.preprocessor
            self.info = {"backend": "torch", "device": device, "precision": "fp32" if amp == "none" else amp,
                         "compiled": compile, "input": {"test_min_size": pre.test_min_size, "max_size": pre.max_size}}
        self.info.update({"model": weights.name, "classes": self.class_names, "category_ids": self.category_ids})

    def predict(self, arrays: list) -> list[dict]:
        if self.onnx is not None:
            return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in d.items()}
                    for d in self.onnx.predict(arrays)]
        import torch

        tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
        from .engine.evaluate import autocast

        with autocast(self.amp, torch.device(self.device).type):
            detections = self.model.predict(tensors, batch_size=len(tensors))
        return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in d.items()} for d in detections]


class Batcher:
    """Collects concurrent requests into batches for one worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int = 8, max_wait_ms: float = 10.0):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, array) -> Future:
        future: Future = Future()
        self.jobs.put((array, future))
        return future

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            try:
                while len(jobs) < self.max_batch:
                    jobs.append(self.jobs.get(timeout=self.max_wait))
            except queue.Empty:
                pass
            # images of one size run together: padding a batch to a common size would change
            # the detections of the smaller images, and an answer must not depend on the traffic
            groups: dict[tuple, list] = {}
            for job in jobs:
                groups.setdefault(job[0].shape, []).append(job)
            for group in groups.values():
                self.batches += 1
                try:
                    results = self.predictor.predict([array for array, _ in group])
                except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                    for _, future in group:
                        future.set_exception(err)
                    continue
                for (_, future), result in zip(group, results):
                    future.set_result(result)


def create_app(predictor: Predictor, max_bytes: int = 20 * 1024 * 1024, max_batch: int = 8):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from .data.image_io import ImageReadError, read_image_bytes

    app = FastAPI(title="retinanet", description="RetinaNet object detection")
    batcher = Batcher(predictor, max_batch)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/info")
    def info():
        return {**predictor.info, "max_bytes": max_bytes, "max_batch": max_batch, "batches_run": batcher.batches}

    @app.post("/predict")
    async def predict(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, f"request of {int(declared):,} bytes is over the limit of {max_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise HTTPException(413, f"request is over the limit of {max_bytes:,} bytes")
        data, name = bytes(body), "body"
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, name = await _file_from_multipart(request, data)
        try:
            image = read_image_bytes(data, name)
        except ImageReadError as err:
            raise HTTPException(400, str(err)) from None
        array = image.permute(1, 2, 0).numpy()
        result = await asyncio.wrap_future(batcher.submit(array))
        detections = [{"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label,
                       "class_name": predictor.class_names[label], "category_id": predictor.category_ids[label]}
                      for box, score, label in zip(result["boxes"], result["scores"], result["labels"])]
        return JSONResponse({"width": array.shape[1], "height": array.shape[0], "detections": detections})

    return app


async def _file_from_multipart(request, body: bytes) -> tuple[bytes, str]:
    from fastapi import HTTPException
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form()
    upload = form.get("file") or next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, "multipart request without a file field (send the image as 'file')")
    return await upload.read(), upload.filename or "upload"


def serve(weights: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          max_bytes: int = 20 * 1024 * 1024, max_batch: int = 8, amp: str = "none", compile: bool = False) -> None:
    import uvicorn

    app = create_app(Predictor(weights, device, amp, compile), max_bytes, max_batch)
    uvicorn.run(app, host=host, port=port, log_level="info")
