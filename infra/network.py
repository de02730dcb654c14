"""Network: a VPC with private subnets, an S3 gateway endpoint and interface endpoints for every AWS
service the jobs and MWAA call, so that pipeline traffic stays on the AWS network."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.config import DeployConfig

#: interface endpoints: ECR (image pulls), logs, STS, Glue, Athena, EMR Serverless, SQS + the three
#: Airflow endpoints (MWAA's Celery queue and its private web server), Secrets Manager, SSM (the DAG's
#: Variables), CloudWatch (custom metrics), KMS, Batch and ECS.
INTERFACE_ENDPOINTS = {
    "EcrApi": ec2.InterfaceVpcEndpointAwsService.ECR,
    "EcrDocker": ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "Monitoring": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING,
    "Sts": ec2.InterfaceVpcEndpointAwsService.STS,
    "Glue": ec2.InterfaceVpcEndpointAwsService.GLUE,
    "Athena": ec2.InterfaceVpcEndpointAwsService.ATHENA,
    "EmrServerless": ec2.InterfaceVpcEndpointAwsService.EMR_SERVERLESS,
    "Sqs": ec2.InterfaceVpcEndpointAwsService.SQS,
    "AirflowApi": ec2.InterfaceVpcEndpointAwsService.AIRFLOW_API,
    "AirflowEnv": ec2.InterfaceVpcEndpointAwsService.AIRFLOW_ENV,
    "AirflowOps": ec2.InterfaceVpcEndpointAwsService.AIRFLOW_OPS,
    "SecretsManager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
    "Ssm": ec2.InterfaceVpcEndpointAwsService.SSM,
    "Kms": ec2.InterfaceVpcEndpointAwsService.KMS,
    "Batch": ec2.InterfaceVpcEndpointAwsService.BATCH,
    "Ecs": ec2.InterfaceVpcEndpointAwsService.ECS,
    "EcsAgent": ec2.InterfaceVpcEndpointAwsService.ECS_AGENT,
    "EcsTelemetry": ec2.InterfaceVpcEndpointAwsService.ECS_TELEMETRY,
}


class NetworkStack(cdk.Stack):
    """The VPC, its endpoints, flow logs, and the security groups of the jobs and of MWAA."""

    def __init__(self, scope: Construct, cid: str, *, config: DeployConfig, log_key: object, **kwargs: object) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        subnets = [
            ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20)
        ]
        if config.nat_gateways:
            subnets.insert(0, ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24))
        else:
            subnets = [
                ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=20)
            ]
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.40.0.0/16"),
            max_azs=2,  # MWAA needs two private subnets in two zones
            nat_gateways=config.nat_gateways,
            subnet_configuration=subnets,
            # True would add a Lambda-backed custom resource; the default group is left unused instead
            restrict_default_security_group=False,
            gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)},
        )
        flow_logs = logs.LogGroup(
            self,
            "FlowLogs",
            log_group_name=f"/{config.prefix}/vpc-flow-logs",
            encryption_key=log_key,  # type: ignore[arg-type]
            retention=logs.RetentionDays.THREE_MONTHS,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        self.vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs))
        self.private_selection = ec2.SubnetSelection(
            subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS if config.nat_gateways else ec2.SubnetType.PRIVATE_ISOLATED
        )
        self.private_subnets = self.vpc.select_subnets(subnet_type=self.private_selection.subnet_type)
        # the jobs (EMR Serverless, ECS tasks, Batch instances): no inbound, HTTPS out
        self.jobs_sg = ec2.SecurityGroup(
            self, "JobsSg", vpc=self.vpc, description="cxr jobs: no inbound, HTTPS out", allow_all_outbound=False
        )
        self.jobs_sg.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS to AWS APIs, S3, PyPI/GitHub via NAT"
        )
        # MWAA: its web server, schedulers and workers talk to each other inside this group (self-referencing)
        self.mwaa_sg = ec2.SecurityGroup(
            self, "MwaaSg", vpc=self.vpc, description="cxr MWAA: self-referencing, HTTPS out", allow_all_outbound=False
        )
        self.mwaa_sg.add_ingress_rule(self.mwaa_sg, ec2.Port.all_traffic(), "MWAA components among themselves")
        self.mwaa_sg.add_egress_rule(self.mwaa_sg, ec2.Port.all_traffic(), "MWAA components among themselves")
        self.mwaa_sg.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS to AWS APIs and S3")
        self.mwaa_sg.add_egress_rule(
            ec2.Peer.ipv4(self.vpc.vpc_cidr_block), ec2.Port.tcp(5432), "MWAA metadata database"
        )
        endpoints_sg = ec2.SecurityGroup(
            self,
            "EndpointsSg",
            vpc=self.vpc,
            description="cxr interface endpoints: HTTPS from the VPC",
            allow_all_outbound=False,
        )
        endpoints_sg.add_ingress_rule(ec2.Peer.ipv4(self.vpc.vpc_cidr_block), ec2.Port.tcp(443), "HTTPS from the VPC")
        # interface_endpoints=none: AWS APIs through the NAT gateway instead (~$280/month less at rest)
        for name, service in INTERFACE_ENDPOINTS.items() if config.interface_endpoints == "all" else ():
            self.vpc.add_interface_endpoint(
                name,
                service=service,
                subnets=self.private_selection,
                security_groups=[endpoints_sg],
                private_dns_enabled=True,
            )
        cdk.CfnOutput(self, "VpcId", value=self.vpc.vpc_id)
        cdk.CfnOutput(self, "PrivateSubnets", value=",".join(self.private_subnets.subnet_ids))
        cdk.CfnOutput(self, "JobsSecurityGroup", value=self.jobs_sg.security_group_id)
