"""What a job costs: windows, model evaluations, FLOPs and memory before it runs
(:mod:`jointdiff.cost.budget`), time per phase after it (:mod:`jointdiff.cost.profiling`)."""
