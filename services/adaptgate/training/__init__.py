"""Training: datasets, finetuning jobs, the training methods and the runners that execute them (see TRAINING.md).

  data/     tenant datasets: parsed and checked at upload, stored, split for training
  db/       the job database (SQLite or PostgreSQL), its schema and migrations
  jobs/     job records, checks at submit, the job store and the JobManager that drives jobs
  methods/  the registry of training methods (head, lora, embed) and `auto`, which picks one
  runners/  where training runs: Ray tasks, checkpoints, the update stream a run reports
  tracking.py  one MLflow run per job

Importing this package is cheap and never imports Ray, gRPC or the api layer: Ray is imported
only when a `RayRunner` starts, so the engine and server stay usable where Ray is absent.
"""
