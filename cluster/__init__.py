"""raydistill cluster: *on what compute* — the one ``ray.init``, job submission, DeepSpeed presets, KubeRay YAML."""
