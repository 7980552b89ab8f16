"""Where the data half's work runs: one seam, "run this pure function over these inputs".

``compute.data.engine`` in the manifest picks the engine. ``in_process`` (the embedded default)
calls the function in the Dagster step's own process, one input after the other. ``ray`` sends
each call as a Ray task to the cluster at ``$RAY_ADDRESS``, launched from the same step: the
assets, partitions, fingerprints and hash gates stay exactly as they are, and as the functions
are pure and deterministic the artifacts are bit-identical on both engines, so the engine is no
part of any fingerprint. Ray is driven directly rather than through dagster-ray or Pipes: the step
stays the Ray driver and needs no second resource or process around it.

The functions must be importable by Ray's workers (module-level functions of this package, which
the cluster's image holds), and their inputs and outputs travel through Ray's object store.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from llm_assets.manifest import DataCompute

T = TypeVar("T")
Calls = Sequence[tuple[Any, ...]]  # the arguments of each call
RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"


class DataEngine(Protocol):
    name: str

    def parallelism(self) -> int:
        """How many calls can run at once: what splitting work into more pieces than that gains nothing."""
        ...

    def map(
        self, function: Callable[..., T], calls: Calls, *, common: Mapping[str, Any] | None = None,
        memory_mb: int | None = None,
    ) -> list[T]:
        """``[function(*args, **common) for args in calls]``, in order; ``memory_mb`` is what one call may use."""
        ...


class InProcessEngine:
    name = "in_process"

    def parallelism(self) -> int:
        return 1

    def map(
        self, function: Callable[..., T], calls: Calls, *, common: Mapping[str, Any] | None = None,
        memory_mb: int | None = None,
    ) -> list[T]:
        return [function(*args, **(common or {})) for args in calls]


class RayEngine:
    """Each call a Ray task; the caller must have connected (:func:`data_engine` does)."""

    name = "ray"

    def parallelism(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(
        self, function: Callable[..., T], calls: Calls, *, common: Mapping[str, Any] | None = None,
        memory_mb: int | None = None,
    ) -> list[T]:
        import ray

        # Ray schedules a task only where its declared memory is free, so no worker holds more
        # than its calls' share at once.
        task = ray.remote(function).options(num_cpus=1, memory=memory_mb * 2**20 if memory_mb else None)
        return ray.get([task.remote(*args, **(common or {})) for args in calls])


class EngineError(RuntimeError):
    """The manifest asks for an engine this process cannot reach."""


@contextlib.contextmanager
def data_engine(settings: DataCompute) -> Iterator[DataEngine]:
    """The engine ``compute.data.engine`` names, connected for the duration of the block.

    On Ray, connects to ``$RAY_ADDRESS`` (``host:port`` of the head node, or ``ray://host:10001``)
    unless this process is already connected, and disconnects afterwards only if it connected.
    """
    if settings.engine == "in_process":
        yield InProcessEngine()
        return
    address = os.environ.get(RAY_ADDRESS_VARIABLE)
    if not address:
        raise EngineError(
            f"compute.data.engine is 'ray' in the manifest but ${RAY_ADDRESS_VARIABLE} is not set: set it to the "
            "Ray cluster's address (host:6379 of the head node, or ray://host:10001), or set compute.data.engine "
            "to in_process"
        )
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise EngineError(
                f"compute.data.engine is 'ray' but no Ray cluster answers at ${RAY_ADDRESS_VARIABLE}={address}: "
                f"start it (`ray start --head`) or correct the address ({exc})"
            ) from exc
    try:
        yield RayEngine()
    finally:
        if connected_here:
            ray.shutdown()
