// ums-test-apiserver: a Kubernetes API server for the tests of UMS-rs, built from Kubernetes'
// own library (k8s.io/apiserver) the way kube-apiserver is: etcd storage through the generic
// registry, static bearer tokens, and the real admission chain (NamespaceLifecycle,
// MutatingAdmissionWebhook, ValidatingAdmissionWebhook with CEL matchConditions).
// What it lacks next to kube-apiserver is listed in README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	noopoteltrace "go.opentelemetry.io/otel/trace/noop"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apiserver/pkg/admission/plugin/webhook/initializer"
	"k8s.io/apiserver/pkg/authentication/group"
	"k8s.io/apiserver/pkg/authentication/request/bearertoken"
	"k8s.io/apiserver/pkg/authentication/token/tokenfile"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	discoveryendpoint "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/component-base/compatibility"
	"k8s.io/klog/v2"

	"ums-rs/apiserver/openapi"
)

var (
	// Scheme holds k8s.io/api's v1 types, registered both as their version and as the
	// internal version (the same Go types: conversion is a copy).
	Scheme = runtime.NewScheme()
	Codecs = serializer.NewCodecFactory(Scheme)
)

func init() {
	must(corev1.AddToScheme(Scheme))
	must(admissionregistrationv1.AddToScheme(Scheme))
	must(policyv1.AddToScheme(Scheme))
	must(discoveryv1.AddToScheme(Scheme))
	internal := func(gv schema.GroupVersion, types ...runtime.Object) {
		Scheme.AddKnownTypes(schema.GroupVersion{Group: gv.Group, Version: runtime.APIVersionInternal}, types...)
	}
	internal(corev1.SchemeGroupVersion, kinds(coreResources, &corev1.Binding{})...)
	internal(admissionregistrationv1.SchemeGroupVersion, kinds(admissionResources)...)
	internal(policyv1.SchemeGroupVersion, kinds(policyResources, &policyv1.Eviction{})...)
	internal(discoveryv1.SchemeGroupVersion, kinds(discoveryResources)...)
	// The list/get/delete options of every group, and the unversioned meta types.
	metav1.AddToGroupVersion(Scheme, schema.GroupVersion{Version: "v1"})
	Scheme.AddUnversionedTypes(schema.GroupVersion{Group: "", Version: "v1"},
		&metav1.Status{}, &metav1.APIVersions{}, &metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
	// Defaulting runs when a request body is decoded, before admission, as in kube-apiserver.
	for _, r := range append(append([]resource{}, coreResources...), admissionResources...) {
		if r.defaulter != nil {
			defaulter := r.defaulter
			Scheme.AddTypeDefaultingFunc(r.newFunc(), func(obj interface{}) { defaulter(obj.(runtime.Object)) })
		}
	}
	must(Scheme.AddFieldLabelConversionFunc(corev1.SchemeGroupVersion.WithKind("Pod"),
		func(label, value string) (string, string, error) {
			switch label {
			case "metadata.name", "metadata.namespace", "spec.nodeName", "status.phase":
				return label, value, nil
			}
			return "", "", fmt.Errorf("field label not supported: %s", label)
		}))
}

// kinds are the object and list types of `resources`, and `others` (kinds that are no
// resource of their own, such as a pod's Binding or Eviction).
func kinds(resources []resource, others ...runtime.Object) []runtime.Object {
	for _, r := range resources {
		others = append(others, r.newFunc(), r.newListFunc())
	}
	return others
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// serviceMap resolves webhook services to addresses on this machine: `ns/name:port=host:port`.
type serviceMap map[string]string

// serviceResolver: the static map, then the lines of a file read at each call (a service
// that starts after this server, such as a coordinator serving the eviction webhook).
type serviceResolver struct {
	static serviceMap
	file   string
}

func (r serviceResolver) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	if u, err := r.static.ResolveEndpoint(namespace, name, port); err == nil || r.file == "" {
		return u, err
	}
	content, err := os.ReadFile(r.file)
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("--service-endpoint-file: %w", err)
	}
	key := fmt.Sprintf("%s/%s:%d", namespace, name, port)
	for _, line := range strings.Split(string(content), "\n") {
		if service, address, ok := strings.Cut(strings.TrimSpace(line), "="); ok && service == key {
			return &url.URL{Scheme: "https", Host: address}, nil
		}
	}
	return nil, fmt.Errorf("service %s is not mapped to an address (--service-endpoint, --service-endpoint-file)", key)
}

func (m serviceMap) String() string { return fmt.Sprint(map[string]string(m)) }
func (m serviceMap) Set(value string) error {
	service, address, ok := strings.Cut(value, "=")
	if !ok {
		return fmt.Errorf("want namespace/name:port=host:port, got %q", value)
	}
	m[service] = address
	return nil
}

func (m serviceMap) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	key := fmt.Sprintf("%s/%s:%d", namespace, name, port)
	address, ok := m[key]
	if !ok {
		return nil, fmt.Errorf("service %s is not mapped to an address (--service-endpoint)", key)
	}
	return &url.URL{Scheme: "https", Host: address}, nil
}

func main() {
	services := serviceMap{}
	listen := flag.String("listen", "127.0.0.1:6443", "address of the HTTPS API")
	etcd := flag.String("etcd", "http://127.0.0.1:2379", "etcd client URL")
	etcdPrefix := flag.String("etcd-prefix", "/registry", "key prefix in etcd (one per cluster sharing an etcd)")
	tokens := flag.String("token-file", "", "static tokens: CSV token,user,uid,\"group1,group2\" (kube-apiserver's --token-auth-file format)")
	certDir := flag.String("cert-dir", "", "where the self-signed serving certificate is written (apiserver.crt is the CA for clients)")
	flag.Var(services, "service-endpoint", "namespace/name:port=host:port for webhook services (repeatable)")
	servicesFile := flag.String("service-endpoint-file", "", "a file of namespace/name:port=host:port lines, read at each webhook call")
	klog.InitFlags(nil)
	flag.Parse()
	if *tokens == "" || *certDir == "" {
		fmt.Fprintln(os.Stderr, "--token-file and --cert-dir are required")
		os.Exit(2)
	}
	if err := run(*listen, *etcd, *etcdPrefix, *tokens, *certDir, serviceResolver{static: services, file: *servicesFile}); err != nil {
		fmt.Fprintln(os.Stderr, "ums-test-apiserver:", err)
		os.Exit(1)
	}
}

func run(listen, etcdURL, etcdPrefix, tokenFile, certDir string, services serviceResolver) error {
	host, portText, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	var port int
	if _, err := fmt.Sscan(portText, &port); err != nil {
		return fmt.Errorf("--listen port: %w", err)
	}

	config := genericapiserver.NewRecommendedConfig(Codecs)
	// One aggregated discovery document (/apis) for this server and the apiextensions server
	// behind it, so custom resources are discovered (kube-apiserver's aggregator does this).
	config.AggregatedDiscoveryGroupManager = discoveryendpoint.NewResourceManager("apis")
	config.EffectiveVersion = compatibility.NewEffectiveVersionFromString("1.36", "", "")
	// OpenAPI of the served types (generated by kube-openapi's openapi-gen in build.sh): the
	// managed-fields machinery, server-side apply and kubectl's validation need it. The namer
	// sees only the external versions.
	external := runtime.NewScheme()
	must(corev1.AddToScheme(external))
	must(admissionregistrationv1.AddToScheme(external))
	must(policyv1.AddToScheme(external))
	must(discoveryv1.AddToScheme(external))
	namer := openapinamer.NewDefinitionNamer(external)
	config.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(openapi.GetOpenAPIDefinitions, namer)
	config.OpenAPIConfig.Info.Title = "ums-test-apiserver"
	config.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(openapi.GetOpenAPIDefinitions, namer)
	config.OpenAPIV3Config.Info.Title = "ums-test-apiserver"

	serving := genericoptions.NewSecureServingOptions().WithLoopback()
	serving.BindAddress = net.ParseIP(host)
	serving.BindPort = port
	serving.ServerCert.CertDirectory = certDir
	serving.ServerCert.PairName = "apiserver"
	if err := serving.MaybeDefaultWithSelfSignedCerts("localhost", nil, []net.IP{net.ParseIP(host)}); err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	if err := serving.ApplyTo(&config.SecureServing, &config.LoopbackClientConfig); err != nil {
		return fmt.Errorf("serving: %w", err)
	}

	tokenAuth, err := tokenfile.NewCSV(tokenFile)
	if err != nil {
		return fmt.Errorf("--token-file: %w", err)
	}
	config.Authentication.Authenticator = group.NewAuthenticatedGroupAdder(bearertoken.New(tokenAuth))
	config.Authorization.Authorizer = authorizerfactory.NewAlwaysAllowAuthorizer()
	genericapiserver.AuthorizeClientBearerToken(config.LoopbackClientConfig, &config.Authentication, &config.Authorization)

	storage := storagebackend.NewDefaultConfig(etcdPrefix, Codecs.LegacyCodec(corev1.SchemeGroupVersion, admissionregistrationv1.SchemeGroupVersion, policyv1.SchemeGroupVersion, discoveryv1.SchemeGroupVersion))
	storage.Transport.ServerList = []string{etcdURL}
	etcdOptions := genericoptions.NewEtcdOptions(storage)
	if err := etcdOptions.ApplyTo(&config.Config); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}

	kubeClient, err := kubernetes.NewForConfig(config.LoopbackClientConfig)
	if err != nil {
		return err
	}
	dynamicClient, err := dynamic.NewForConfig(config.LoopbackClientConfig)
	if err != nil {
		return err
	}
	config.SharedInformerFactory = informers.NewSharedInformerFactory(kubeClient, 10*time.Minute)
	admission := genericoptions.NewAdmissionOptions()
	// The admission-policy plugins need API groups this server does not serve.
	admission.DisablePlugins = []string{"MutatingAdmissionPolicy", "ValidatingAdmissionPolicy"}
	webhookInit := initializer.NewPluginInitializer(
		webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, config.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		services)
	if err := admission.ApplyTo(&config.Config, config.SharedInformerFactory, kubeClient, dynamicClient,
		utilfeature.DefaultFeatureGate, config.EffectiveVersion, webhookInit); err != nil {
		return fmt.Errorf("admission: %w", err)
	}

	// CustomResourceDefinitions: apiextensions-apiserver behind this server, as in kube-apiserver.
	crdServer, err := newCRDServer(config, etcdOptions, services)
	if err != nil {
		return fmt.Errorf("apiextensions: %w", err)
	}
	server, err := config.Complete().New("ums-test-apiserver", crdServer.GenericAPIServer)
	if err != nil {
		return err
	}
	if err := install(server, config.RESTOptionsGetter); err != nil {
		return err
	}
	server.AddPostStartHookOrDie("ums-default-namespaces", func(hook genericapiserver.PostStartHookContext) error {
		go createNamespaces(hook, kubeClient, "default", "kube-system", "kube-public")
		return nil
	})
	ctx := genericapiserver.SetupSignalContext()
	return server.PrepareRun().RunWithContext(ctx)
}

// install serves the core group at /api, and admissionregistration.k8s.io, policy and
// discovery.k8s.io at /apis.
func install(server *genericapiserver.GenericAPIServer, optsGetter generic.RESTOptionsGetter) error {
	stores := map[string]*genericregistry.Store{}
	storageFor := func(resources []resource) (map[string]rest.Storage, error) {
		storage := map[string]rest.Storage{}
		for _, r := range resources {
			store, err := newStore(optsGetter, r)
			if err != nil {
				return nil, err
			}
			stores[r.plural] = store
			storage[r.plural] = store
			if len(r.shortNames) > 0 {
				storage[r.plural] = shortNamed{Store: store, names: r.shortNames}
			}
			if r.hasStatus {
				storage[r.plural+"/status"] = newStatusREST(store)
			}
		}
		return storage, nil
	}
	core := genericapiserver.NewDefaultAPIGroupInfo("", Scheme, metav1.ParameterCodec, Codecs)
	coreStorage, err := storageFor(coreResources)
	if err != nil {
		return err
	}
	// A group served at /apis (version v1) with its storage.
	installGroup := func(group string, storage map[string]rest.Storage) error {
		info := genericapiserver.NewDefaultAPIGroupInfo(group, Scheme, metav1.ParameterCodec, Codecs)
		info.VersionedResourcesStorageMap["v1"] = storage
		if err := server.InstallAPIGroup(&info); err != nil {
			return fmt.Errorf("%s/v1: %w", group, err)
		}
		return nil
	}
	policyStorage, err := storageFor(policyResources)
	if err != nil {
		return err
	}
	coreStorage["pods/eviction"] = &evictionREST{pods: stores["pods"], pdbs: stores["poddisruptionbudgets"]}
	coreStorage["pods/binding"] = &bindingREST{pods: stores["pods"]}
	core.VersionedResourcesStorageMap["v1"] = coreStorage
	if err := server.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, &core); err != nil {
		return fmt.Errorf("core/v1: %w", err)
	}
	admissionStorage, err := storageFor(admissionResources)
	if err != nil {
		return err
	}
	if err := installGroup(admissionregistrationv1.GroupName, admissionStorage); err != nil {
		return err
	}
	if err := installGroup(policyv1.GroupName, policyStorage); err != nil {
		return err
	}
	// EndpointSlices, which the rig's endpoints controller (the placing node agent) writes for
	// Services, as kube-controller-manager's does.
	discoveryStorage, err := storageFor(discoveryResources)
	if err != nil {
		return err
	}
	return installGroup(discoveryv1.GroupName, discoveryStorage)
}

// createNamespaces makes the namespaces every cluster has, once the server answers.
func createNamespaces(ctx context.Context, client kubernetes.Interface, names ...string) {
	for _, name := range names {
		for {
			_, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
			if err == nil || apierrors.IsAlreadyExists(err) {
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
}
