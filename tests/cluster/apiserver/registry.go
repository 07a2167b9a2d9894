package main

// The served resources: Kubernetes' generic registry store (etcd storage, watch,
// resourceVersion, selectors, patch, dry-run all come from k8s.io/apiserver) with a small
// strategy per resource. Internal and external versions are the same Go types (k8s.io/api's
// v1 types), so the scheme converts between them by copying.

import (
	"context"
	"fmt"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/names"
	"sigs.k8s.io/structured-merge-diff/v6/fieldpath"
)

// strategy is what the generic store asks of a resource. Validation is left out (see README):
// only what the store itself enforces (names, resourceVersion, uid) applies.
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	namespaced bool
	// status: this strategy serves the status subresource (only status may change).
	status bool
	// hasStatus: the main resource keeps the stored status on update.
	hasStatus bool
}

func (s strategy) NamespaceScoped() bool { return s.namespaced }

func (s strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	if pod, ok := obj.(*corev1.Pod); ok {
		// A new pod is Pending until its node agent says otherwise.
		pod.Status = corev1.PodStatus{Phase: corev1.PodPending}
	}
}

func (s strategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	switch {
	case s.status:
		// pods/status: everything but the status comes from the stored object.
		if pod, ok := obj.(*corev1.Pod); ok {
			oldPod := old.(*corev1.Pod)
			status := pod.Status
			*pod = *oldPod.DeepCopy()
			pod.Status = status
		}
		if node, ok := obj.(*corev1.Node); ok {
			oldNode := old.(*corev1.Node)
			status := node.Status
			*node = *oldNode.DeepCopy()
			node.Status = status
		}
	case s.hasStatus:
		if pod, ok := obj.(*corev1.Pod); ok {
			pod.Status = old.(*corev1.Pod).Status
		}
		if node, ok := obj.(*corev1.Node); ok {
			node.Status = old.(*corev1.Node).Status
		}
	}
}

func (s strategy) Validate(context.Context, runtime.Object) field.ErrorList { return nil }
func (s strategy) WarningsOnCreate(context.Context, runtime.Object) []string {
	return nil
}
func (s strategy) Canonicalize(runtime.Object)    {}
func (s strategy) AllowCreateOnUpdate() bool      { return false }
func (s strategy) AllowUnconditionalUpdate() bool { return true }
func (s strategy) ValidateUpdate(context.Context, runtime.Object, runtime.Object) field.ErrorList {
	return nil
}
func (s strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

// GetResetFields: server-side apply's reset fields (the subresource split of pods).
func (s strategy) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	if !s.hasStatus && !s.status {
		return nil
	}
	path := "status"
	if s.status {
		path = "spec"
	}
	return map[fieldpath.APIVersion]*fieldpath.Set{
		"v1": fieldpath.NewSet(fieldpath.MakePathOrDie(path)),
	}
}

// attributes returns the fields a field selector may use.
func attributes(extra func(runtime.Object) fields.Set) storage.AttrFunc {
	return func(obj runtime.Object) (labels.Set, fields.Set, error) {
		accessor, err := metaAccessor(obj)
		if err != nil {
			return nil, nil, err
		}
		set := fields.Set{"metadata.name": accessor.GetName()}
		if accessor.GetNamespace() != "" {
			set["metadata.namespace"] = accessor.GetNamespace()
		}
		if extra != nil {
			for k, v := range extra(obj) {
				set[k] = v
			}
		}
		return labels.Set(accessor.GetLabels()), set, nil
	}
}

func metaAccessor(obj runtime.Object) (metav1.Object, error) {
	accessor, ok := obj.(metav1.Object)
	if !ok {
		return nil, fmt.Errorf("%T has no object metadata", obj)
	}
	return accessor, nil
}

func podFields(obj runtime.Object) fields.Set {
	pod := obj.(*corev1.Pod)
	return fields.Set{"spec.nodeName": pod.Spec.NodeName, "status.phase": string(pod.Status.Phase)}
}

// resource describes one served resource.
type resource struct {
	group, plural, singular string
	newFunc, newListFunc    func() runtime.Object
	namespaced              bool
	hasStatus               bool
	fields                  func(runtime.Object) fields.Set
	// shortNames: what discovery lists for kubectl (`kubectl get pdb`).
	shortNames []string
	// defaulter is registered with the scheme (see init in main.go).
	defaulter func(runtime.Object)
}

func newStore(optsGetter generic.RESTOptionsGetter, r resource) (*genericregistry.Store, error) {
	s := strategy{
		ObjectTyper:   Scheme,
		NameGenerator: names.SimpleNameGenerator,
		namespaced:    r.namespaced,
		hasStatus:     r.hasStatus,
	}
	attrs := attributes(r.fields)
	qualified := schema.GroupResource{Group: r.group, Resource: r.plural}
	store := &genericregistry.Store{
		NewFunc:     r.newFunc,
		NewListFunc: r.newListFunc,
		PredicateFunc: func(label labels.Selector, field fields.Selector) storage.SelectionPredicate {
			return storage.SelectionPredicate{Label: label, Field: field, GetAttrs: attrs}
		},
		DefaultQualifiedResource:  qualified,
		SingularQualifiedResource: schema.GroupResource{Group: r.group, Resource: r.singular},
		CreateStrategy:            s,
		UpdateStrategy:            s,
		DeleteStrategy:            s,
		ResetFieldsStrategy:       s,
		TableConvertor:            rest.NewDefaultTableConvertor(qualified),
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: optsGetter, AttrFunc: attrs}); err != nil {
		return nil, fmt.Errorf("store for %s: %w", qualified, err)
	}
	return store, nil
}

// shortNamed is a store that says its short names in discovery.
type shortNamed struct {
	*genericregistry.Store
	names []string
}

func (s shortNamed) ShortNames() []string { return s.names }

// statusREST serves pods/status: the same storage, an update that only changes status.
type statusREST struct {
	store *genericregistry.Store
}

func newStatusREST(main *genericregistry.Store) *statusREST {
	status := *main
	s := main.UpdateStrategy.(strategy)
	s.status = true
	s.hasStatus = false
	status.UpdateStrategy = s
	status.ResetFieldsStrategy = s
	return &statusREST{store: &status}
}

func (r *statusREST) New() runtime.Object { return r.store.NewFunc() }
func (r *statusREST) Destroy()            {}
func (r *statusREST) Get(ctx context.Context, name string, options *metav1.GetOptions) (runtime.Object, error) {
	return r.store.Get(ctx, name, options)
}
func (r *statusREST) Update(ctx context.Context, name string, objInfo rest.UpdatedObjectInfo, createValidation rest.ValidateObjectFunc, updateValidation rest.ValidateObjectUpdateFunc, _ bool, options *metav1.UpdateOptions) (runtime.Object, bool, error) {
	return r.store.Update(ctx, name, objInfo, createValidation, updateValidation, false, options)
}
func (r *statusREST) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	return r.store.GetResetFields()
}

var coreResources = []resource{
	{plural: "pods", singular: "pod", namespaced: true, hasStatus: true, fields: podFields,
		newFunc: func() runtime.Object { return &corev1.Pod{} }, newListFunc: func() runtime.Object { return &corev1.PodList{} },
		defaulter: defaultPod},
	// Nodes (+status): what a kubelet registers, with its addresses and its endpoint's port
	// (daemonEndpoints), which clients of the kubelet API read.
	{plural: "nodes", singular: "node", hasStatus: true,
		newFunc: func() runtime.Object { return &corev1.Node{} }, newListFunc: func() runtime.Object { return &corev1.NodeList{} }},
	{plural: "namespaces", singular: "namespace",
		newFunc: func() runtime.Object { return &corev1.Namespace{} }, newListFunc: func() runtime.Object { return &corev1.NamespaceList{} },
		defaulter: defaultNamespace},
	{plural: "services", singular: "service", namespaced: true,
		newFunc: func() runtime.Object { return &corev1.Service{} }, newListFunc: func() runtime.Object { return &corev1.ServiceList{} }},
	{plural: "secrets", singular: "secret", namespaced: true,
		newFunc: func() runtime.Object { return &corev1.Secret{} }, newListFunc: func() runtime.Object { return &corev1.SecretList{} }},
	{plural: "configmaps", singular: "configmap", namespaced: true,
		newFunc: func() runtime.Object { return &corev1.ConfigMap{} }, newListFunc: func() runtime.Object { return &corev1.ConfigMapList{} }},
	{plural: "serviceaccounts", singular: "serviceaccount", namespaced: true,
		newFunc: func() runtime.Object { return &corev1.ServiceAccount{} }, newListFunc: func() runtime.Object { return &corev1.ServiceAccountList{} }},
	{plural: "events", singular: "event", namespaced: true,
		newFunc: func() runtime.Object { return &corev1.Event{} }, newListFunc: func() runtime.Object { return &corev1.EventList{} }},
}

// EndpointSlices (discovery.k8s.io/v1): what kube-proxy reads to reach a Service's pods.
var discoveryResources = []resource{
	{group: discoveryv1.GroupName, plural: "endpointslices", singular: "endpointslice", namespaced: true,
		newFunc:     func() runtime.Object { return &discoveryv1.EndpointSlice{} },
		newListFunc: func() runtime.Object { return &discoveryv1.EndpointSliceList{} }},
}

var admissionResources = []resource{
	{group: admissionregistrationv1.GroupName, plural: "mutatingwebhookconfigurations", singular: "mutatingwebhookconfiguration",
		newFunc:     func() runtime.Object { return &admissionregistrationv1.MutatingWebhookConfiguration{} },
		newListFunc: func() runtime.Object { return &admissionregistrationv1.MutatingWebhookConfigurationList{} },
		defaulter:   defaultWebhookConfiguration},
	{group: admissionregistrationv1.GroupName, plural: "validatingwebhookconfigurations", singular: "validatingwebhookconfiguration",
		newFunc:     func() runtime.Object { return &admissionregistrationv1.ValidatingWebhookConfiguration{} },
		newListFunc: func() runtime.Object { return &admissionregistrationv1.ValidatingWebhookConfigurationList{} },
		defaulter:   defaultWebhookConfiguration},
}
