"""The AWS CDK app: the whole pipeline as code (stacks by concern), synthesized in-process from Python."""
