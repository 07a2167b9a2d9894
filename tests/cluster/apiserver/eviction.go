package main

// pods/eviction and policy/v1 PodDisruptionBudgets, as kube-apiserver serves them for
// `kubectl drain`: an Eviction goes through the admission chain (a validating webhook for
// CREATE pods/eviction sees it, and may answer 429 "not yet"), then the pod's budget is
// checked (429 TooManyRequests when the eviction would leave fewer healthy pods than it
// needs), then the pod is deleted. Unlike kube-apiserver, the budget is computed on the spot
// from the pods it selects (no disruption controller keeps its status), and ownerless pods
// count as they are (kube-apiserver asks their controller's scale for percentages).

import (
	"context"
	"fmt"
	"net/http"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metainternalversion "k8s.io/apimachinery/pkg/apis/meta/internalversion"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
)

var policyResources = []resource{
	{group: policyv1.GroupName, plural: "poddisruptionbudgets", singular: "poddisruptionbudget", namespaced: true, hasStatus: true,
		shortNames: []string{"pdb"},
		newFunc:     func() runtime.Object { return &policyv1.PodDisruptionBudget{} },
		newListFunc: func() runtime.Object { return &policyv1.PodDisruptionBudgetList{} }},
}

// evictionREST serves pods/eviction.
type evictionREST struct {
	pods *genericregistry.Store
	pdbs *genericregistry.Store
}

var _ rest.NamedCreater = &evictionREST{}
var _ rest.GroupVersionKindProvider = &evictionREST{}

func (r *evictionREST) New() runtime.Object { return &policyv1.Eviction{} }
func (r *evictionREST) Destroy()            {}

// GroupVersionKind: an Eviction is policy/v1's, served under the pods of core/v1 (kubectl
// drain finds it so in discovery).
func (r *evictionREST) GroupVersionKind(schema.GroupVersion) schema.GroupVersionKind {
	return policyv1.SchemeGroupVersion.WithKind("Eviction")
}

func (r *evictionREST) Create(ctx context.Context, name string, obj runtime.Object, createValidation rest.ValidateObjectFunc, options *metav1.CreateOptions) (runtime.Object, error) {
	eviction, ok := obj.(*policyv1.Eviction)
	if !ok {
		return nil, apierrors.NewBadRequest(fmt.Sprintf("not an Eviction: %T", obj))
	}
	if eviction.Name != "" && eviction.Name != name {
		return nil, apierrors.NewBadRequest("name in URL does not match name in Eviction object")
	}
	// The validating webhooks (CREATE pods/eviction), as kube-apiserver's EvictionREST runs them.
	if createValidation != nil {
		if err := createValidation(ctx, eviction.DeepCopyObject()); err != nil {
			return nil, err
		}
	}
	stored, err := r.pods.Get(ctx, name, &metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	pod := stored.(*corev1.Pod)
	if !canIgnoreBudget(pod) {
		if err := r.checkBudget(ctx, pod); err != nil {
			return nil, err
		}
	}
	deleteOptions := eviction.DeleteOptions
	if deleteOptions == nil {
		deleteOptions = &metav1.DeleteOptions{}
	}
	if len(options.DryRun) > 0 {
		deleteOptions = deleteOptions.DeepCopy()
		deleteOptions.DryRun = options.DryRun
	}
	if _, _, err := r.pods.Delete(ctx, name, rest.ValidateAllObjectFunc, deleteOptions); err != nil {
		return nil, err
	}
	return &metav1.Status{Status: metav1.StatusSuccess, Code: http.StatusCreated}, nil
}

// canIgnoreBudget: a pod that is not running (terminal, pending) or already being deleted
// disrupts nothing, as kube-apiserver decides.
func canIgnoreBudget(pod *corev1.Pod) bool {
	return pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded ||
		pod.Status.Phase == corev1.PodFailed || pod.Status.Phase == corev1.PodPending
}

func healthy(pod *corev1.Pod) bool {
	if pod.DeletionTimestamp != nil {
		return false
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// checkBudget answers 429 when evicting pod would leave its budget short.
func (r *evictionREST) checkBudget(ctx context.Context, pod *corev1.Pod) error {
	listed, err := r.pdbs.List(ctx, &metainternalversion.ListOptions{})
	if err != nil {
		return err
	}
	var budgets []policyv1.PodDisruptionBudget
	for _, pdb := range listed.(*policyv1.PodDisruptionBudgetList).Items {
		selector, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
		if err != nil || pdb.Spec.Selector == nil {
			continue
		}
		if selector.Matches(labels.Set(pod.Labels)) {
			budgets = append(budgets, pdb)
		}
	}
	if len(budgets) == 0 {
		return nil
	}
	if len(budgets) > 1 {
		return apierrors.NewInternalError(fmt.Errorf("This pod has more than one PodDisruptionBudget, which the eviction subresource does not support."))
	}
	pdb := budgets[0]
	// An unhealthy pod may go (kube-apiserver's default IfHealthyBudget lets it go while the
	// budget holds; here it always may: it adds nothing to the budget).
	if !healthy(pod) {
		return nil
	}
	selector, _ := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
	selected, err := r.pods.List(ctx, &metainternalversion.ListOptions{LabelSelector: selector})
	if err != nil {
		return err
	}
	expected, current := 0, 0
	for i := range selected.(*corev1.PodList).Items {
		p := &selected.(*corev1.PodList).Items[i]
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		expected++
		if healthy(p) {
			current++
		}
	}
	desired := 0
	switch {
	case pdb.Spec.MinAvailable != nil:
		desired, err = intstr.GetScaledValueFromIntOrPercent(pdb.Spec.MinAvailable, expected, true)
	case pdb.Spec.MaxUnavailable != nil:
		var unavailable int
		unavailable, err = intstr.GetScaledValueFromIntOrPercent(pdb.Spec.MaxUnavailable, expected, false)
		desired = expected - unavailable
	}
	if err != nil {
		return apierrors.NewInternalError(fmt.Errorf("PodDisruptionBudget %s: %w", pdb.Name, err))
	}
	if current-desired > 0 {
		return nil
	}
	return &apierrors.StatusError{ErrStatus: metav1.Status{
		Status:  metav1.StatusFailure,
		Code:    http.StatusTooManyRequests,
		Reason:  metav1.StatusReasonTooManyRequests,
		Message: "Cannot evict pod as it would violate the pod's disruption budget.",
		Details: &metav1.StatusDetails{Causes: []metav1.StatusCause{{
			Type:    "DisruptionBudget",
			Message: fmt.Sprintf("The disruption budget %s needs %d healthy pods and has %d currently", pdb.Name, desired, current),
		}}},
	}}
}

// bindingREST serves pods/binding, as the scheduler binds a pod to a node (the rig's
// placement step, in the node agent, posts it): the pod's spec.nodeName is set once; a pod
// bound already is a 409.
type bindingREST struct {
	pods *genericregistry.Store
}

var _ rest.NamedCreater = &bindingREST{}

func (r *bindingREST) New() runtime.Object { return &corev1.Binding{} }
func (r *bindingREST) Destroy()            {}

func (r *bindingREST) Create(ctx context.Context, name string, obj runtime.Object, createValidation rest.ValidateObjectFunc, options *metav1.CreateOptions) (runtime.Object, error) {
	binding, ok := obj.(*corev1.Binding)
	if !ok {
		return nil, apierrors.NewBadRequest(fmt.Sprintf("not a Binding: %T", obj))
	}
	if binding.Name != "" && binding.Name != name {
		return nil, apierrors.NewBadRequest("name in URL does not match name in Binding object")
	}
	if binding.Target.Kind != "" && binding.Target.Kind != "Node" {
		return nil, apierrors.NewBadRequest("a pod is bound to a Node")
	}
	if binding.Target.Name == "" {
		return nil, apierrors.NewBadRequest("the Binding names no node (target.name)")
	}
	if createValidation != nil {
		if err := createValidation(ctx, binding.DeepCopyObject()); err != nil {
			return nil, err
		}
	}
	node := binding.Target.Name
	_, _, err := r.pods.Update(ctx, name, rest.DefaultUpdatedObjectInfo(nil, func(_ context.Context, _, stored runtime.Object) (runtime.Object, error) {
		// The first transformer of an update without an object builds it from the stored one.
		pod, ok := stored.(*corev1.Pod)
		if !ok {
			return nil, apierrors.NewInternalError(fmt.Errorf("pods/binding: stored object is %T", stored))
		}
		pod = pod.DeepCopy()
		if pod.DeletionTimestamp != nil {
			return nil, apierrors.NewConflict(corev1.Resource("pods/binding"), name, fmt.Errorf("pod %s is being deleted, cannot be assigned to a host", name))
		}
		if pod.Spec.NodeName != "" {
			return nil, apierrors.NewConflict(corev1.Resource("pods/binding"), name, fmt.Errorf("pod %v is already assigned to node %q", name, pod.Spec.NodeName))
		}
		// The node agent writes the status (PodScheduled with the rest).
		pod.Spec.NodeName = node
		return pod, nil
	}), rest.ValidateAllObjectFunc, rest.ValidateAllObjectUpdateFunc, false, &metav1.UpdateOptions{DryRun: options.DryRun})
	if err != nil {
		return nil, err
	}
	return &metav1.Status{Status: metav1.StatusSuccess, Code: http.StatusCreated}, nil
}
