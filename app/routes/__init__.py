"""One router per resource: health (health, readiness, metrics), models, image and text classification."""
