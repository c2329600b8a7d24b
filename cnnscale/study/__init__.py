"""study: scaling studies, from a spec to run directories.

spec (the study file, validated) -> matrix (Point, expand) -> local | slurm runners (launcher: one launch per point;
outcome: point.json) -> main (the ``cnnscale study`` command). submit renders one training job's sbatch script;
allreduce_bench is a launch target the study runs. Import the modules themselves; this package re-exports nothing.
"""

__all__: list[str] = []
