"""Environment variables the runner sets on Terraform for the stub provider it launches.

Internal plumbing between two halves of this package (Terraform passes its environment on to provider
plugins), not user configuration.
"""

SCHEMA_ENV = "SD_LAMBDA_TFCHECK_SCHEMA"  # path of the provider schema JSON(.gz)
DATA_OVERRIDES_ENV = "SD_LAMBDA_TFCHECK_DATA_OVERRIDES"  # JSON: {data source type: {attribute: value}}
