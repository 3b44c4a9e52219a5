"""Scaling out: offline batch jobs (`gemma3n batch`) and many replicas behind one OpenAI API (`serve --ray`).

- `engine`: one model behind the server's own app, called in process, so a batch row means exactly what the same
  request body means to `gemma3n serve` (limits, errors, defaults, continuous batching);
- `batch_rows` / `batch_job`: the file formats (OpenAI Batch API JSONL, folders of images or audio), ordered and
  resumable output, progress, and the local runner; `job`: `run_batch`, which runs a job locally or on Ray;
- `ray_data` / `ray_serve`: the same job as a Ray Data pipeline, and the server as a Ray Serve deployment. Only these
  two import Ray (the `ray` extra), and only when called.
"""
