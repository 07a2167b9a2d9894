package main

// Defaulting that kube-apiserver applies from k8s.io/kubernetes (not packaged): only the fields
// the product and the webhook plugins depend on.

import (
	"strings"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func defaultPod(obj runtime.Object) {
	pod := obj.(*corev1.Pod)
	if pod.Spec.RestartPolicy == "" {
		pod.Spec.RestartPolicy = corev1.RestartPolicyAlways
	}
	if pod.Spec.TerminationGracePeriodSeconds == nil {
		grace := int64(30)
		pod.Spec.TerminationGracePeriodSeconds = &grace
	}
	if pod.Spec.DNSPolicy == "" {
		pod.Spec.DNSPolicy = corev1.DNSClusterFirst
	}
	if pod.Spec.ServiceAccountName == "" {
		pod.Spec.ServiceAccountName = "default"
	}
	for _, list := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range list {
			defaultContainer(&list[i])
		}
	}
}

func defaultContainer(c *corev1.Container) {
	if c.ImagePullPolicy == "" {
		c.ImagePullPolicy = corev1.PullIfNotPresent
		last := c.Image[strings.LastIndex(c.Image, "/")+1:]
		if !strings.Contains(c.Image, "@") && (!strings.Contains(last, ":") || strings.HasSuffix(last, ":latest")) {
			c.ImagePullPolicy = corev1.PullAlways
		}
	}
	if c.TerminationMessagePath == "" {
		c.TerminationMessagePath = corev1.TerminationMessagePathDefault
	}
	if c.TerminationMessagePolicy == "" {
		c.TerminationMessagePolicy = corev1.TerminationMessageReadFile
	}
	for i := range c.Ports {
		if c.Ports[i].Protocol == "" {
			c.Ports[i].Protocol = corev1.ProtocolTCP
		}
	}
}

func defaultNamespace(obj runtime.Object) {
	ns := obj.(*corev1.Namespace)
	// kube-apiserver's namespace strategy labels every namespace with its name (webhook
	// namespaceSelectors rely on it).
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels[corev1.LabelMetadataName] = ns.Name
	if ns.Status.Phase == "" {
		ns.Status.Phase = corev1.NamespaceActive
	}
}

// defaultWebhookConfiguration applies admissionregistration/v1's defaults: without them the
// webhook plugins match nothing (a nil namespaceSelector matches no namespace).
func defaultWebhookConfiguration(obj runtime.Object) {
	fail := admissionregistrationv1.Fail
	equivalent := admissionregistrationv1.Equivalent
	never := admissionregistrationv1.NeverReinvocationPolicy
	allScopes := admissionregistrationv1.AllScopes
	timeout := int32(10)
	common := func(policy **admissionregistrationv1.FailurePolicyType, match **admissionregistrationv1.MatchPolicyType,
		ns, objects **metav1.LabelSelector, seconds **int32, rules []admissionregistrationv1.RuleWithOperations,
		client *admissionregistrationv1.WebhookClientConfig) {
		if *policy == nil {
			*policy = &fail
		}
		if *match == nil {
			*match = &equivalent
		}
		if *ns == nil {
			*ns = &metav1.LabelSelector{}
		}
		if *objects == nil {
			*objects = &metav1.LabelSelector{}
		}
		if *seconds == nil {
			*seconds = &timeout
		}
		for i := range rules {
			if rules[i].Scope == nil {
				rules[i].Scope = &allScopes
			}
		}
		if client.Service != nil && client.Service.Port == nil {
			port := int32(443)
			client.Service.Port = &port
		}
	}
	switch c := obj.(type) {
	case *admissionregistrationv1.MutatingWebhookConfiguration:
		for i := range c.Webhooks {
			w := &c.Webhooks[i]
			common(&w.FailurePolicy, &w.MatchPolicy, &w.NamespaceSelector, &w.ObjectSelector, &w.TimeoutSeconds, w.Rules, &w.ClientConfig)
			if w.ReinvocationPolicy == nil {
				w.ReinvocationPolicy = &never
			}
		}
	case *admissionregistrationv1.ValidatingWebhookConfiguration:
		for i := range c.Webhooks {
			w := &c.Webhooks[i]
			common(&w.FailurePolicy, &w.MatchPolicy, &w.NamespaceSelector, &w.ObjectSelector, &w.TimeoutSeconds, w.Rules, &w.ClientConfig)
		}
	}
}
