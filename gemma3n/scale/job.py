"""`gemma3n batch`: a job run locally (batch_job.py) or as a Ray Data pipeline (ray_data.py, only with --ray)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .batch_job import BatchInput, OrderedOutput, Progress, run_local
from .engine import EngineSpec


def run_batch(source: BatchInput, output_path: str | Path, spec: EngineSpec, overwrite: bool = False,
              use_ray: bool = False, address: str | None = None, replicas: int = 1,
              progress: bool = True) -> dict:
    """Run the job (locally, or on Ray with `replicas` engines); returns a summary. Rerunning resumes."""
    source.check()
    named = source.first_model()
    if named is not None and named != spec.settings.model_name:
        raise ValueError(f"the requests in {source.path} name the model {named!r}, but this job serves "
                         f"{spec.settings.model_name!r}; pass --served-model-name {named} to answer them with "
                         "this model (a request naming another model gets a 404, as from the server)")
    total = source.count()
    output = OrderedOutput(Path(output_path), source, overwrite)
    resumed, bar = output.done, Progress(total, output.done, enabled=progress)
    started = time.perf_counter()
    try:
        if output.done < total and use_ray:
            from .ray_data import cluster_cpus, connect, run_on_ray
            connect(address)
            threads = spec.threads or max(1, cluster_cpus() // replicas)
            run_on_ray(source, output, dataclasses.replace(spec, threads=threads), bar, replicas)
        elif output.done < total:
            run_local(source, output, spec, bar)
    finally:
        output.close()
        bar.finish()
    seconds = time.perf_counter() - started
    return {"rows": total, "finished_before": resumed,
            "answered": bar.answered, "errors": bar.errors, "seconds": round(seconds, 2),
            "rows_per_second": round(bar.answered / seconds, 3) if seconds > 0 else None,
            "output": str(output_path)}
