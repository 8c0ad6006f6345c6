//! The dispatcher's one RabbitMQ publisher: opened at start, re-opened on
//! the next use after RabbitMQ dropped it, and thrown away when a confirm
//! does not come in time (its channel is in an unknown state; a broker that
//! is only slow is reconnected to at no cost).

use std::time::Duration;

use common::queue::{self, JobMessage, JobPublisher, QueueError};
use common::rules::ValidJob;
use common::status::JobStatus;
use common::status_store::StatusStore;
use common::{webhook, Names};
use lapin::Connection;
use tokio::sync::Mutex;

/// How long closing a thrown-away connection may take, in the background.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

struct Open {
    connection: Connection,
    publisher: JobPublisher,
}

struct State {
    url: String,
    names: Names,
    confirm_timeout: Duration,
    open: Option<Open>,
    /// Connections opened so far: the open one, if any, is the last.
    opened: u64,
}

impl State {
    /// The open publisher and its generation, re-opened first if RabbitMQ
    /// dropped it.
    async fn publisher(&mut self) -> Result<(JobPublisher, u64), QueueError> {
        if let Some(open) = self.open.as_ref().filter(|o| o.publisher.is_connected()) {
            return Ok((open.publisher.clone(), self.opened));
        }
        let (connection, publisher) = connect(&self.url, &self.names, self.confirm_timeout).await?;
        self.discard();
        self.opened += 1;
        self.open = Some(Open {
            connection,
            publisher: publisher.clone(),
        });
        Ok((publisher, self.opened))
    }

    /// Forgets the open connection and closes it in the background.
    fn discard(&mut self) {
        if let Some(old) = self.open.take() {
            tokio::spawn(async move {
                let closing = old.connection.close(200, "replaced".into());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
            });
        }
    }
}

/// Publishes jobs (and the webhook events of states the dispatcher writes)
/// with confirms. Cheap to share: the lock is held only to take or re-open
/// the publisher, never across a publish and its confirm, so that submits
/// publish concurrently on the one channel.
pub struct Publishing {
    state: Mutex<State>,
}

impl Publishing {
    /// Connects to `url` and declares the topology; each publish then waits
    /// at most `confirm_timeout` for RabbitMQ's confirm.
    pub async fn open(url: &str, names: Names, confirm_timeout: Duration) -> Result<Self, QueueError> {
        let mut state = State {
            url: url.to_string(),
            names,
            confirm_timeout,
            open: None,
            opened: 0,
        };
        state.publisher().await?;
        Ok(Publishing {
            state: Mutex::new(state),
        })
    }

    /// Publishes one job and waits for its confirm. A confirm that does not
    /// come in time also throws the connection away, so that the next
    /// publish starts on a fresh one.
    pub async fn publish(&self, message: &JobMessage<ValidJob>) -> Result<(), QueueError> {
        let (publisher, generation) = self.state.lock().await.publisher().await?;
        let published = publisher.publish(message, message.request.priority).await;
        if let Err(QueueError::Unconfirmed(..)) = &published {
            let mut state = self.state.lock().await;
            // Unless another publish replaced it already.
            if state.open.is_some() && state.opened == generation {
                state.discard();
            }
        }
        published
    }

    /// Puts the webhook event of a state the dispatcher wrote (a cancel
    /// while queued, a publish that failed) on the webhook queue. Best
    /// effort, logged: the state is written and answered already, and no
    /// worker will take the job to announce it again.
    pub async fn announce(&self, store: &StatusStore, status: &JobStatus) {
        let channel = self
            .state
            .lock()
            .await
            .publisher()
            .await
            .map(|(p, _)| p.channel().clone());
        let announced = match channel {
            Ok(channel) => webhook::announce(&channel, store, status)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("no RabbitMQ connection: {e}")),
        };
        if let Err(e) = announced {
            tracing::error!(id = %status.id, state = %status.state, error = %e, "could not announce the webhook event");
        }
    }

    /// Whether RabbitMQ is reachable now (re-opening the connection if it
    /// was dropped).
    pub async fn is_healthy(&self) -> bool {
        self.state.lock().await.publisher().await.is_ok()
    }
}

/// A connection, its publisher and the declared topology, within
/// [`queue::CONNECT_TIMEOUT`] in all (a broker may take the connection and
/// then answer nothing).
async fn connect(
    url: &str,
    names: &Names,
    confirm_timeout: Duration,
) -> Result<(Connection, JobPublisher), QueueError> {
    let opening = async {
        let connection = queue::connect(url, "sdxl-dispatcher").await?;
        let publisher = JobPublisher::new(&connection, names.clone())
            .await?
            .with_confirm_timeout(confirm_timeout);
        webhook::declare_webhook_queue(publisher.channel(), names).await?;
        Ok((connection, publisher))
    };
    tokio::time::timeout(queue::CONNECT_TIMEOUT, opening)
        .await
        .map_err(|_| QueueError::ConnectTimeout(queue::CONNECT_TIMEOUT))?
}
