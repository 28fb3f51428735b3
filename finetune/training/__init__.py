"""Training: the run plan, validation, freezing and its schedule, optimizer groups and
schedules, the LightningModule, callbacks, the feature cache, resume, and one run end to end."""
