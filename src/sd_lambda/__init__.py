"""sd-lambda: serve a diffusers text-to-image model from an IAM-protected AWS Lambda function URL."""

__version__ = "0.1.0"
