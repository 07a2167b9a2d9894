//! Where a migration goes: another cluster, whose coordinator makes the copy (over mutual
//! TLS, [`crate::peer`]), or another node of this cluster, whose copy this coordinator makes
//! itself with the same destination code ([`crate::destination`]) a peer would run.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::Api;
use serde_json::Value;

use crate::destination::{CreateAnswer, CreateRequest, PodRequest};
use crate::error::ApiError;
use crate::peer::{Identity, Peer};
use crate::placement::{choose_node, copy_name_at, original_name, CopyPlace, NodeFacts};
use crate::state::Coordinator;

/// A placement refusal as the API answers it.
fn refusal(e: crate::placement::PlacementError) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::from_u16(e.status()).unwrap_or(axum::http::StatusCode::CONFLICT),
        e.to_string(),
    )
}

/// The destination a migration into this same cluster (another node) records, in its
/// journal, its record and its copy's source annotation.
pub const THIS_CLUSTER: &str = "this-cluster";

/// A migration's destination.
#[derive(Debug, Clone)]
pub enum Target {
    /// Another cluster's coordinator.
    Peer(Peer),
    /// This cluster (another node).
    ThisCluster,
}

impl Target {
    /// The destination a request or a journal names (`THIS_CLUSTER`, or a peer's URL).
    pub fn of(client: reqwest::Client, destination: &str) -> Self {
        if destination == THIS_CLUSTER {
            Target::ThisCluster
        } else {
            Target::Peer(Peer::new(client, destination.to_owned()))
        }
    }
}

impl Coordinator {
    /// What the destination's coordinator says of itself.
    pub(crate) async fn target_identity(&self, target: &Target) -> Result<Identity, ApiError> {
        match target {
            Target::Peer(peer) => peer.identity().await,
            Target::ThisCluster => Ok(self.identity()),
        }
    }

    /// What this coordinator says of itself (`GET /`).
    pub fn identity(&self) -> Identity {
        Identity {
            service: "ums-coordinator".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            cluster: self.cluster.clone(),
            interfaces: vec![
                "dind".into(),
                "pind".into(),
                crate::orchestrator::INTERFACE.into(),
            ],
            public_key: self.signing_key.public_key(),
        }
    }

    /// `/create` at the destination.
    pub(crate) async fn target_create(
        &self,
        target: &Target,
        request: &CreateRequest,
        timeout: Duration,
    ) -> Result<CreateAnswer, ApiError> {
        match target {
            Target::Peer(peer) => peer.post("/create", request, timeout).await,
            Target::ThisCluster => {
                // Dropped mid-way (an operator's abort), the copy may exist: the caller's
                // rollback deletes it by its name, as it does a peer's.
                match tokio::time::timeout(timeout, self.create_destination(request.clone())).await
                {
                    Ok(answer) => answer,
                    Err(_) => Err(ApiError::new(
                        axum::http::StatusCode::GATEWAY_TIMEOUT,
                        format!("the copy was not ready within {} s", timeout.as_secs()),
                    )),
                }
            }
        }
    }

    /// `/restore` at the destination (a peer checks the credential it issued).
    pub(crate) async fn target_restore(
        &self,
        target: &Target,
        request: &PodRequest,
        credential: &str,
    ) -> Result<Value, ApiError> {
        match target {
            Target::Peer(peer) => {
                peer.post_with(
                    "/restore",
                    request,
                    Some(credential),
                    Duration::from_secs(60),
                )
                .await
            }
            Target::ThisCluster => self.activate_destination(request.clone()).await,
        }
    }

    /// `/delete` at the destination.
    pub(crate) async fn target_delete(
        &self,
        target: &Target,
        request: &PodRequest,
    ) -> Result<Value, ApiError> {
        match target {
            Target::Peer(peer) => peer.post("/delete", request, Duration::from_secs(60)).await,
            Target::ThisCluster => self.delete_destination(request.clone()).await,
        }
    }

    /// Waits (two minutes at most) until the destination holds no copy `request.name` of the
    /// migration any more: `/delete` is asked until it answers `deleted: false` (it deletes
    /// a passive copy, and says false once none is there).
    pub(crate) async fn copy_gone(
        &self,
        target: &Target,
        request: &PodRequest,
    ) -> Result<(), ApiError> {
        let until = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let answer = self.target_delete(target, request).await?;
            if answer["deleted"] == Value::Bool(false) {
                return Ok(());
            }
            if std::time::Instant::now() > until {
                return Err(ApiError::conflict(format!(
                    "pod {}/{} is still there two minutes after its deletion",
                    request.namespace, request.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Where migration `id`'s copy of `pod` (running on `source`) is created at `target`: in
    /// this cluster on [`Coordinator::place_copy`]'s node under a name of its own; in another
    /// under the pod's name, on `wanted` if asked ([`CopyPlace`]).
    pub(crate) async fn copy_place(
        &self,
        target: &Target,
        pod: &Pod,
        source: Option<&str>,
        wanted: Option<&str>,
        id: &str,
    ) -> Result<CopyPlace, ApiError> {
        let this_cluster = matches!(target, Target::ThisCluster);
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        Ok(CopyPlace {
            name: copy_name_at(this_cluster, pod, id),
            node: match this_cluster {
                true => Some(self.place_copy(source, wanted).await?),
                false => wanted.map(str::to_owned),
            },
            original: this_cluster
                .then(|| original_name(name, pod.metadata.annotations.as_ref()).to_owned()),
        })
    }

    /// The node of this cluster that takes a copy of a pod running on `source`: `wanted` if
    /// it can, else the least loaded Ready, schedulable other node.
    pub(crate) async fn place_copy(
        &self,
        source: Option<&str>,
        wanted: Option<&str>,
    ) -> Result<String, ApiError> {
        let nodes: Api<Node> = Api::all(self.kube.clone());
        let pods: Api<Pod> = Api::all(self.kube.clone());
        let mut facts = Vec::new();
        // A named node is judged alone, and its load does not matter.
        if let Some(name) = wanted {
            if let Some(node) = nodes.get_opt(name).await? {
                facts.push(NodeFacts::of(&node, 0));
            }
            return choose_node(&self.cluster, &facts, source, wanted).map_err(refusal);
        }
        for node in nodes.list(&ListParams::default()).await? {
            let name = node.metadata.name.clone().unwrap_or_default();
            let bound = pods
                .list_metadata(&ListParams::default().fields(&format!("spec.nodeName={name}")))
                .await?
                .items
                .len();
            facts.push(NodeFacts::of(&node, bound));
        }
        choose_node(&self.cluster, &facts, source, wanted).map_err(refusal)
    }
}
