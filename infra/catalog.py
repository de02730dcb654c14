"""Catalog: the Glue database the DAG declares the published tables in, and the Athena workgroup that
queries them (engine v3, results SSE-KMS in the lake bucket, a bytes-scanned limit per query)."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_athena as athena
from aws_cdk import aws_glue as glue
from constructs import Construct

from infra.config import ATHENA_PREFIX, DeployConfig
from infra.storage import StorageStack


class CatalogStack(cdk.Stack):
    """Glue database + Athena workgroup."""

    def __init__(
        self, scope: Construct, cid: str, *, config: DeployConfig, storage: StorageStack, **kwargs: object
    ) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        self.database_name = config.prefix.replace("-", "_")
        self.database = glue.CfnDatabase(
            self,
            "Database",
            catalog_id=self.account,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=self.database_name, description="cxr: the published Delta tables (symlink manifests)"
            ),
        )
        self.results_uri = f"s3://{storage.lake_bucket.bucket_name}/{ATHENA_PREFIX}"
        self.workgroup_name = config.prefix
        self.workgroup = athena.CfnWorkGroup(
            self,
            "WorkGroup",
            name=self.workgroup_name,
            description="cxr: queries over the published tables",
            state="ENABLED",
            recursive_delete_option=False,
            work_group_configuration=athena.CfnWorkGroup.WorkGroupConfigurationProperty(
                enforce_work_group_configuration=True,
                publish_cloud_watch_metrics_enabled=True,
                bytes_scanned_cutoff_per_query=config.athena_bytes_scanned_limit,
                engine_version=athena.CfnWorkGroup.EngineVersionProperty(
                    selected_engine_version="Athena engine version 3"
                ),
                result_configuration=athena.CfnWorkGroup.ResultConfigurationProperty(
                    output_location=self.results_uri,
                    encryption_configuration=athena.CfnWorkGroup.EncryptionConfigurationProperty(
                        encryption_option="SSE_KMS", kms_key=storage.key.key_arn
                    ),
                ),
            ),
        )
        cdk.CfnOutput(self, "GlueDatabase", value=self.database_name)
        cdk.CfnOutput(self, "AthenaWorkGroup", value=self.workgroup_name)
        cdk.CfnOutput(self, "AthenaOutput", value=self.results_uri)
