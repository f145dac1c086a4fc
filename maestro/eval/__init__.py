"""Downstream evaluation: tasks and metrics, probe and fine-tune phases, in-loop probe, embeddings
and encoder export (maestro_reference.md §1.9, §5)."""
