terraform {
  required_version = ">= 1.6"

  required_providers {
    # 6.28.0 added aws_lambda_permission.invoked_via_function_url (modules/lambda uses it; provider
    # CHANGELOG 6.28.0, hashicorp/terraform-provider-aws#44858): older 6.x reject the argument.
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.28, < 7.0"
    }
  }
}
