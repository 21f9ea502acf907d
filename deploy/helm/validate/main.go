// Command validate checks rendered Kubernetes manifests offline: every object is decoded strictly into its Go API
// type, chosen by apiVersion and kind, the way an API server with fieldValidation=Strict decodes a request. An
// unknown or duplicate field, a value of the wrong type, or a kind none of the registered API groups defines fails.
//
// Usage: helm template ... | validate        (or: validate FILE...)
//
// The registered groups are the built-in ones the aimesh chart uses (k8s.io/api), KEDA's keda.sh/v1alpha1 (its own
// Go types, plus the checks of its admission webhook that need no cluster) and prometheus-operator's
// monitoring.coreos.com/v1. It prints one line per object and exits 1 if any object fails.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	kedav1alpha1 "github.com/kedacore/keda/v2/apis/keda/v1alpha1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsyaml "sigs.k8s.io/yaml"
)

func newScheme() (*runtime.Scheme, error) {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme,
		appsv1.AddToScheme,
		batchv1.AddToScheme,
		policyv1.AddToScheme,
		autoscalingv2.AddToScheme,
		rbacv1.AddToScheme,
		kedav1alpha1.AddToScheme,
		monitoringv1.AddToScheme,
	} {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	return scheme, nil
}

// document is one YAML document of the input and where it came from.
type document struct {
	data   []byte
	source string
}

func readDocuments(name string, r io.Reader) ([]document, error) {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var docs []document
	for {
		data, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if isEmpty(data) {
			continue
		}
		docs = append(docs, document{data: data, source: sourceOf(name, data, len(docs)+1)})
	}
}

// isEmpty: only comments and blank lines (helm prints a "# Source:" line for a template that rendered nothing).
func isEmpty(data []byte) bool {
	var v any
	return sigsyaml.Unmarshal(data, &v) == nil && v == nil
}

// sourceOf names the chart template helm rendered the document from, else its position in the input.
func sourceOf(name string, data []byte, index int) string {
	for _, line := range strings.Split(string(data), "\n") {
		if after, ok := strings.CutPrefix(line, "# Source: "); ok {
			return after
		}
	}
	return fmt.Sprintf("%s, document %d", name, index)
}

// validate decodes one document strictly and returns "Kind/name".
func validate(decoder runtime.Decoder, doc document) (string, error) {
	obj, gvk, err := decoder.Decode(doc.data, nil, nil)
	id := identify(obj, gvk)
	if err != nil {
		// A strict decoding error (unknown or duplicate field) comes with a decoded object: it is still a failure.
		return id, err
	}
	if so, ok := obj.(*kedav1alpha1.ScaledObject); ok {
		if err := checkScaledObject(so); err != nil {
			return id, err
		}
	}
	return id, nil
}

// identify names an object "Kind/name" as far as it was decoded.
func identify(obj runtime.Object, gvk *schema.GroupVersionKind) string {
	kind, name := "?", "?"
	if gvk != nil && gvk.Kind != "" {
		kind = gvk.Kind
	}
	if obj != nil {
		if accessor, err := meta.Accessor(obj); err == nil {
			name = accessor.GetName()
		}
	}
	return kind + "/" + name
}

// checkScaledObject runs the checks of KEDA's admission webhook that need no cluster.
func checkScaledObject(so *kedav1alpha1.ScaledObject) error {
	if err := kedav1alpha1.CheckReplicaCountBoundsAreValid(so); err != nil {
		return err
	}
	if err := kedav1alpha1.CheckFallbackValid(so); err != nil {
		return err
	}
	return kedav1alpha1.ValidateTriggers(so.Spec.Triggers)
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	scheme, err := newScheme()
	if err != nil {
		fmt.Fprintln(stderr, "validate:", err)
		return 2
	}
	decoder := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme, scheme,
		json.SerializerOptions{Yaml: true, Strict: true})
	var docs []document
	if len(args) == 0 {
		docs, err = readDocuments("stdin", stdin)
	} else {
		for _, path := range args {
			data, readErr := os.ReadFile(path)
			if readErr != nil {
				err = readErr
				break
			}
			more, docErr := readDocuments(path, bytes.NewReader(data))
			docs, err = append(docs, more...), docErr
			if err != nil {
				break
			}
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "validate:", err)
		return 2
	}
	if len(docs) == 0 {
		fmt.Fprintln(stderr, "validate: no objects in the input")
		return 1
	}
	failed := 0
	for _, doc := range docs {
		id, err := validate(decoder, doc)
		if err != nil {
			failed++
			fmt.Fprintf(stdout, "FAIL %s (%s): %v\n", id, doc.source, err)
			continue
		}
		fmt.Fprintf(stdout, "ok   %s (%s)\n", id, doc.source)
	}
	fmt.Fprintf(stdout, "%d objects, %d failed\n", len(docs), failed)
	if failed > 0 {
		return 1
	}
	return 0
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
