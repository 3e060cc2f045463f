# Planning infra/examples/baked offline with the function (`make plan-offline`, tests).
image_uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-baked@sha256:7e1d2c3b4a5968778695a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c1b0a9f"
