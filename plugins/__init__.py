"""align's built-in non-stage plugins (model sources, dataset formats, PEFT methods, rollout engines…),
each listed under the ``align`` entry-point group in pyproject.toml like a third party's."""
