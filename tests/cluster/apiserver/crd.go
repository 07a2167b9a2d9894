package main

// CustomResourceDefinitions, served by k8s.io/apiextensions-apiserver chained behind this
// server as its delegate, the way kube-apiserver chains it: requests this server does not
// serve (apiextensions.k8s.io and every custom resource) go to it.

import (
	"fmt"

	noopoteltrace "go.opentelemetry.io/otel/trace/noop"
	apiextensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	apiextensionsoptions "k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	extensionsopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/util/webhook"
)

// newCRDServer builds the apiextensions server from this server's settings (serving,
// authentication, authorization, admission, loopback client, informers).
func newCRDServer(main *genericapiserver.RecommendedConfig, etcdOptions *genericoptions.EtcdOptions, services webhook.ServiceResolver) (*apiextensionsapiserver.CustomResourceDefinitions, error) {
	config := genericapiserver.NewRecommendedConfig(apiextensionsapiserver.Codecs)
	config.SecureServing = main.SecureServing
	config.LoopbackClientConfig = main.LoopbackClientConfig
	config.Authentication = main.Authentication
	config.Authorization = main.Authorization
	config.AdmissionControl = main.AdmissionControl
	config.EffectiveVersion = main.EffectiveVersion
	config.SharedInformerFactory = main.SharedInformerFactory
	config.ClientConfig = main.ClientConfig
	config.MergedResourceConfig = apiextensionsapiserver.DefaultAPIResourceConfigSource()
	config.AggregatedDiscoveryGroupManager = main.AggregatedDiscoveryGroupManager
	namer := openapinamer.NewDefinitionNamer(apiextensionsapiserver.Scheme)
	config.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(extensionsopenapi.GetOpenAPIDefinitions, namer)
	config.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(extensionsopenapi.GetOpenAPIDefinitions, namer)
	// The apiextensions group is stored as v1 JSON in the same etcd.
	crdEtcd := *etcdOptions
	crdEtcd.StorageConfig.Codec = apiextensionsapiserver.Codecs.LegacyCodec(apiextensionsapiserver.Scheme.PrioritizedVersionsAllGroups()...)
	if err := crdEtcd.ApplyTo(&config.Config); err != nil {
		return nil, fmt.Errorf("etcd for CRDs: %w", err)
	}
	extensions := &apiextensionsapiserver.Config{
		GenericConfig: config,
		ExtraConfig: apiextensionsapiserver.ExtraConfig{
			CRDRESTOptionsGetter: apiextensionsoptions.NewCRDRESTOptionsGetter(crdEtcd, nil, nil),
			MasterCount:          1,
			ServiceResolver:      services,
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, main.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	return extensions.Complete().New(genericapiserver.NewEmptyDelegate())
}
