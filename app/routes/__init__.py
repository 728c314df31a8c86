"""One router per resource: health (health, readiness, metrics), models, image, text and multimodal classification."""
