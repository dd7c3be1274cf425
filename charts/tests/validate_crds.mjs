// Validates custom resources (JSON documents, one array on stdin) against the schemas the npm
// package @kubernetes-models/prometheus-operator ships; prints one line per document and exits 1
// on the first invalid one. Kubernetes' own kinds are validated by kubernetes-validate instead.
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const doc of JSON.parse(input)) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const Model = models[key];
  if (!Model) {
    console.log(`${key} ${doc.metadata?.name}: no schema known for this custom resource`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`${key} ${doc.metadata?.name}: valid`);
  } catch (error) {
    console.log(`${key} ${doc.metadata?.name}: INVALID ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
