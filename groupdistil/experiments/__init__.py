"""``groupdistil compare``: a grid of runs over methods, seeds and parameter values, and its statistical report.

    groupdistil compare EXPERIMENT.yaml --data-root DIR --out OUT [--debug]

The experiment file is described in :mod:`.schema`. The package, in the order a comparison runs:

- :mod:`.schema`: the experiment file (:class:`~.schema.Experiment`, :func:`~.schema.load_experiment`);
- :mod:`.plan`: the grid of runs (:class:`~.plan.RunSpec`, :func:`~.plan.plan_runs`) and the names of its folders;
- :mod:`.run`: data synthesis, training every run, and :func:`~.run.run_comparison`, the entry point;
- :mod:`.summary`: the runs' test metrics, grouped by variant and paired for the statistical tests;
- :mod:`.report`: ``runs.csv``, ``comparison.csv``, ``paired_tests.csv``, ``report.{md,html}`` and the plots;
- :mod:`.cli`: the ``compare`` subcommand.

Layout of OUT (per data level ``OUT/<level>/`` when ``data.sweep`` is given)::

    teacher/                                        # one teacher per data level, shared by all students
    runs/<method>[__<key>=<value>...]__seed=<n>/    # <key>: last part of the dotted sweep key (unless ambiguous)
    runs.csv  comparison.csv  paired_tests.csv  report.md  report.html  plots/*.png

Every run is a ``Trainer`` run folder: a finished one (metrics.json present, same config) is skipped and an
interrupted one resumes, so rerunning the same command continues an interrupted comparison (a finished run whose
settings changed is refused: delete its folder to retrain it). Students name their teacher by its checkpoint (the
teacher run's config hash and step), not by its path, so a moved or copied OUT keeps its finished runs. Statistics:
see :mod:`groupdistil.stats` (std over seeds is the sample std; paired t-test across seeds; Wilcoxon across cases of
B's worst group, each case averaged over the seeds, when the pipeline's ``case_scores`` gives per-case scores).
"""


def __getattr__(name: str):  # run_comparison without importing torch when the package is only looked at
    if name == "run_comparison":
        from .run import run_comparison

        return run_comparison
    raise AttributeError(name)

__all__ = ["run_comparison"]
