"""Jobs: the TOML job spec, validated before any model loads (:mod:`jointdiff.jobs.spec`),
writing a job back as TOML (:mod:`jointdiff.jobs.toml_writer`), and batches of many jobs
(:mod:`jointdiff.jobs.batch`: a cache of loaded models in :mod:`jointdiff.jobs.cache`, job
files and manifests in :mod:`jointdiff.jobs.manifest`, a Ray cluster in
:mod:`jointdiff.jobs.ray_batch`)."""
