"""Developer tools: offline Terraform checks, the local Lambda runtime, test models, the bench,
FLOP counts and the generated docs. Needs the ``dev`` extra; none of it ships in the image.
"""
