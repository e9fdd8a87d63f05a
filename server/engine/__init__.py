"""The serving engine: step-level (continuous) batching of DDPM sampling on one device.

    engine = Engine(model.load(path), EngineConfig(max_batch=32))
    await engine.start()
    handle = engine.submit(validate(GenerationSpec(n=4, steps=50, sampler="ddim"), engine.model_info().limits))
    async for event in handle.events(): ...      # Queued, Started, Progress, Frame..., Done | Failed
    await engine.shutdown()

It implements server.contract.EngineClient and knows nothing of HTTP. Importing it loads torch
and the model: the API layer never does (it sees only server.contract).
"""

from .engine import Engine

__all__ = ["Engine"]
