"""Operator tools: deploy the stack, build and push its image, read its outputs, call the function.

Needs the ``ops`` extra (boto3, python-terraform, ...), never torch or diffusers.
"""
