"""Seeding: put a diffusers model on EFS as a new, verified revision, switched atomically.

Operator side (boto3, huggingface_hub): ``sources`` (hub / folder) -> ``upload`` (S3 + manifest) ->
``seeder`` (start, SSM agent Online, stop) -> ``remote`` (SSM Run Command) -> ``flow`` ties them together;
``cli`` is ``sd-lambda seed`` / ``rollback``. Seeder side (standard library, Python 3.9, S3 through the
AWS CLI): ``efs_sync``, packed with ``sd_lambda.layout`` and put in the weights bucket by ``payload``.
"""
