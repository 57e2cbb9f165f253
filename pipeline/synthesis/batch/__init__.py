"""Batch teachers: a stage's requests as OpenAI batch JSONL, through a provider's Batch API
(``/v1/files`` + ``/v1/batches``) or vLLM's offline batch engine, into the same request cache.

- :mod:`~pipeline.synthesis.batch.config`: ``teacher.batch`` (limits, polling, attempts);
- :mod:`~pipeline.synthesis.batch.state`: every job's file id, batch id, custom ids and status in
  the run's SQLite (the request cache's file), written before and after every API call;
- :mod:`~pipeline.synthesis.batch.lines`: request -> JSONL line, files split by count, bytes
  and tokens, output/error lines -> results;
- :mod:`~pipeline.synthesis.batch.api`: the OpenAI files/batches protocol;
  :mod:`~pipeline.synthesis.batch.offline`: the same calls over ``vllm run-batch``;
- :mod:`~pipeline.synthesis.batch.runner`: the loop (upload, submit, poll, reconcile, resubmit);
- :mod:`~pipeline.synthesis.batch.manage`: list and cancel a run's batches.

Nothing is imported here, so :mod:`pipeline.synthesis.teachers.base` can import the config
without a cycle.
"""
