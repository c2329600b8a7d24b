"""Training: ``run(cfg)`` builds each part from its own config section (build), runs the loop (loop, step),
and writes the run directory (rundir); optimiser and LR schedule (schedule), checkpoints, preemption, progress,
DeepSpeed and experiment trackers live beside it. ``python -m cnnscale.train`` is the launch target (cli)."""

__all__: list[str] = []
