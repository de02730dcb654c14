"""Monitoring: an SNS topic (KMS) for alarms, alarms on DAG task failures, EMR job failures, Batch and ECS
task failures, the quarantine share and validation failures (custom metrics the DAG publishes), and a
dashboard. Failures of EMR, Batch and ECS arrive as EventBridge events: each rule notifies the topic and
an alarm watches the rule's matches."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from infra.compute import ComputeStack
from infra.config import METRICS_NAMESPACE, DeployConfig
from infra.orchestration import OrchestrationStack
from infra.storage import StorageStack

#: the custom metrics the DAG publishes (namespace CXR/Pipeline, no dimensions)
PIPELINE_METRICS = (
    "QuarantineShare",
    "ValidationFailures",
    "TaskFailures",
    "ImagesPreprocessed",
    "ImagesQuarantined",
    "PredictionsWritten",
)


class MonitoringStack(cdk.Stack):
    """Alarms, the events that feed them, and the dashboard."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        *,
        config: DeployConfig,
        storage: StorageStack,
        compute: ComputeStack,
        orchestration: OrchestrationStack,
        **kwargs: object,
    ) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        self.topic = sns.Topic(
            self, "Alarms", topic_name=f"{config.prefix}-alarms", master_key=storage.key, enforce_ssl=True
        )
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))
        action = cw_actions.SnsAction(self.topic)

        def pipeline(metric: str, statistic: str) -> cw.Metric:
            return cw.Metric(
                namespace=METRICS_NAMESPACE, metric_name=metric, statistic=statistic, period=cdk.Duration.minutes(5)
            )

        self.alarms: dict[str, cw.Alarm] = {}

        def alarm(cid: str, metric: cw.IMetric, threshold: float, description: str, *, above: bool = True) -> None:
            made = cw.Alarm(
                self,
                cid,
                alarm_name=f"{config.prefix}-{cid}",
                alarm_description=description,
                metric=metric,
                threshold=threshold,
                evaluation_periods=1,
                comparison_operator=cw.ComparisonOperator.GREATER_THAN_THRESHOLD
                if above
                else cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            )
            made.add_alarm_action(action)
            self.alarms[cid] = made

        alarm(
            "task-failures",
            pipeline("TaskFailures", "Sum"),
            1,
            "a task of the cxr DAG failed (Airflow on_failure_callback)",
            above=False,
        )
        alarm(
            "quarantine-share",
            pipeline("QuarantineShare", "Maximum"),
            config.max_quarantine_share,
            f"a preprocessing run quarantined more than {config.max_quarantine_share:.0%} of its files",
        )
        alarm(
            "validation-failures",
            pipeline("ValidationFailures", "Sum"),
            1,
            "a Great Expectations validation failed",
            above=False,
        )

        # EMR job, Batch job and ECS task failures: EventBridge rules -> the topic, and an alarm on each rule
        patterns = {
            "emr-job-failed": events.EventPattern(
                source=["aws.emr-serverless"],
                detail_type=["EMR Serverless Job Run State Change"],
                detail={"state": ["FAILED"], "applicationId": [compute.emr_app.attr_application_id]},
            ),
            "batch-job-failed": events.EventPattern(
                source=["aws.batch"],
                detail_type=["Batch Job State Change"],
                detail={
                    "status": ["FAILED"],
                    "jobQueue": [
                        f"arn:{self.partition}:batch:{self.region}:{self.account}:job-queue/{compute.batch_name}"
                    ],
                },
            ),
            "ecs-task-failed": events.EventPattern(
                source=["aws.ecs"],
                detail_type=["ECS Task State Change"],
                detail={
                    "lastStatus": ["STOPPED"],
                    "clusterArn": [compute.cluster.cluster_arn],
                    "containers": {"exitCode": [{"anything-but": 0}]},
                },
            ),
        }
        for cid, pattern in patterns.items():
            rule = events.Rule(self, f"{cid}-rule", rule_name=f"{config.prefix}-{cid}", event_pattern=pattern)
            rule.add_target(targets.SnsTopic(self.topic))
            matched = cw.Metric(
                namespace="AWS/Events",
                metric_name="TriggeredRules",
                dimensions_map={"RuleName": rule.rule_name},
                statistic="Sum",
                period=cdk.Duration.minutes(5),
            )
            alarm(cid, matched, 1, f"{cid.replace('-', ' ')} (EventBridge rule {config.prefix}-{cid})", above=False)

        dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=config.prefix)
        dashboard.add_widgets(
            cw.GraphWidget(
                title="Images per run",
                left=[
                    pipeline("ImagesPreprocessed", "Sum"),
                    pipeline("ImagesQuarantined", "Sum"),
                    pipeline("PredictionsWritten", "Sum"),
                ],
            ),
            cw.GraphWidget(
                title="Quarantine share",
                left=[pipeline("QuarantineShare", "Maximum")],
                left_annotations=[cw.HorizontalAnnotation(value=config.max_quarantine_share, label="alarm")],
            ),
            cw.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms.values())),
        )
        dashboard.add_widgets(
            cw.GraphWidget(
                title="Failures", left=[pipeline("ValidationFailures", "Sum"), pipeline("TaskFailures", "Sum")]
            ),
            cw.LogQueryWidget(
                title="Inference errors",
                log_group_names=[compute.log_groups["infer"].log_group_name],
                query_lines=[
                    "fields @timestamp, @message",
                    "filter @message like /(?i)error/",
                    "sort @timestamp desc",
                    "limit 50",
                ],
            ),
        )
        cdk.CfnOutput(self, "AlarmTopicArn", value=self.topic.topic_arn)
        _ = orchestration
