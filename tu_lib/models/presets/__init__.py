"""The presets behind models.load_vlm: micro (tests), llava (the papers' models), organism (offline)."""
