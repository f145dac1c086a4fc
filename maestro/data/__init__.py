"""The streaming loader: shards (local or s3://) -> model batches, for every rank of a job.

Stages: manifest and shard list (`plan`), split across ranks and workers and shuffled by
(seed, epoch) (`plan`), tar reading by index with retries and digests (`shards.reader`), safe decode (`shards.schema`),
date policy (`dates`), crop, scaling and flips (`geometry`, `transforms`, `prepare`), collate
(`collate`), in resumable per-worker streams (`stream`) behind `build_loader` (`loader`).
"""

from maestro.data.loader import Loader, build_loader

__all__ = ["Loader", "build_loader"]
