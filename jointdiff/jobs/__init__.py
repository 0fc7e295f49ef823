"""Jobs: the TOML job spec, validated before any model loads (:mod:`jointdiff.jobs.spec`),
and writing a job back as TOML (:mod:`jointdiff.jobs.toml_writer`)."""
