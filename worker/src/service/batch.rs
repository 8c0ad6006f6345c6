//! Which of the deliveries a worker holds run together: the lead (the
//! highest priority, the earliest delivered among equals) and, in the same
//! order, every other job that can share its denoising loop (an equal
//! [`BatchKey`]) while the batch stays within its caps, never two
//! deliveries of one job (a duplicate publish: the job's lease, ours for
//! both, would not keep them apart). Pure decisions, so the tests below
//! check them without a queue.

use common::queue::decode_message;
use common::rules::ValidJob;
use uuid::Uuid;

use super::job::sampler;
use crate::engine::{BatchKey, StartKind};
use crate::ranks::share_images;

/// How large a batch may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCaps {
    /// Jobs in one batch (`--max-batch-jobs`).
    pub jobs: usize,
    /// Images one rank makes in one batch, every job's (`--max-batch-images`).
    pub images_per_rank: usize,
}

/// A held delivery as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The job's id, when the message has one.
    pub id: Option<Uuid>,
    pub priority: u8,
    /// `None`: it does not decode, so it runs alone (and is dead-lettered).
    pub key: Option<BatchKey>,
    /// Its images on each rank.
    pub images: Vec<usize>,
}

impl Candidate {
    /// A delivery's payload and priority, for a worker of `world` ranks.
    pub fn of(payload: &[u8], priority: u8, world: usize) -> Self {
        match decode_message(payload) {
            Ok(message) => Candidate {
                id: Some(message.id),
                priority,
                key: Some(batch_key(&message.request)),
                images: share_images(message.request.num_images.map_or(world, |n| n as usize), world),
            },
            Err(e) => Candidate {
                id: e.id,
                priority,
                key: None,
                images: vec![0; world],
            },
        }
    }
}

/// What a job must share with others to be batched with them, from the
/// request (before its inputs are fetched): the engine's [`BatchKey`], with
/// a LoRA named by its pinned sha256 (or, unpinned, by its name: two jobs
/// then batch only if the names agree, and the engine splits them should
/// the files differ).
pub fn batch_key(job: &ValidJob) -> BatchKey {
    let start = match (&job.image, &job.mask) {
        (None, _) => StartKind::Text,
        (Some(_), None) => StartKind::Image,
        (Some(_), Some(_)) => StartKind::Inpaint,
    };
    BatchKey {
        width: job.width as usize,
        height: job.height as usize,
        num_inference_steps: job.num_inference_steps as usize,
        scheduler: sampler(job.scheduler),
        guidance: job.guidance_scale > 1.0,
        start,
        strength: match start {
            StartKind::Text => 1.0,
            _ => job.strength.unwrap_or(1.0),
        },
        loras: job
            .loras
            .iter()
            .map(|l| {
                let id = l.sha256.clone().unwrap_or_else(|| format!("name:{}", l.name));
                (id, l.scale)
            })
            .collect(),
    }
}

/// The candidates to run as the next batch, by index, the lead first and
/// the others in priority, then delivery, order. Never empty when
/// `candidates` is not; the lead runs even when it alone is over the caps.
pub fn plan(candidates: &[Candidate], caps: BatchCaps) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // stable: the earliest delivered first among equal priorities
    order.sort_by_key(|&i| std::cmp::Reverse(candidates[i].priority));
    let Some((&lead, rest)) = order.split_first() else {
        return Vec::new();
    };
    let mut picked = vec![lead];
    let Some(key) = &candidates[lead].key else {
        return picked;
    };
    let mut load = candidates[lead].images.clone();
    for &i in rest {
        if picked.len() >= caps.jobs {
            break;
        }
        let c = &candidates[i];
        if c.key.as_ref() != Some(key) || c.images.len() != load.len() {
            continue;
        }
        if picked.iter().any(|&p| candidates[p].id == c.id) {
            continue;
        }
        let fits = load.iter().zip(&c.images).all(|(a, b)| a + b <= caps.images_per_rank);
        if fits {
            load.iter_mut().zip(&c.images).for_each(|(a, b)| *a += b);
            picked.push(i);
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::rules::{validate, JobRequest, LoraRequest};
    use uuid::Uuid;

    fn request(prompt: &str) -> JobRequest {
        JobRequest {
            prompt: Some(prompt.into()),
            width: Some(512),
            height: Some(512),
            num_inference_steps: Some(4),
            ..Default::default()
        }
    }

    fn payload(req: &JobRequest) -> Vec<u8> {
        let job = validate(req, || 1).unwrap();
        let message = common::queue::JobMessage {
            id: Uuid::new_v4(),
            created_at: chrono::Utc::now(),
            owner: None,
            request: job,
        };
        serde_json::to_vec(&message).unwrap()
    }

    fn candidate(req: &JobRequest, priority: u8) -> Candidate {
        Candidate::of(&payload(req), priority, 2)
    }

    const CAPS: BatchCaps = BatchCaps {
        jobs: 4,
        images_per_rank: 8,
    };

    #[test]
    fn compatible_jobs_join_the_lead_in_order_and_others_wait() {
        let a = request("a");
        let b = JobRequest {
            seed: Some(5),
            guidance_scale: Some(9.0),
            num_images: Some(3),
            preview_every: Some(1),
            negative_prompt: Some(String::new()),
            ..request("b")
        };
        let wide = JobRequest {
            width: Some(768),
            ..request("c")
        };
        let no_guidance = JobRequest {
            guidance_scale: Some(1.0),
            ..request("d")
        };
        let other_sampler = JobRequest {
            scheduler: Some("ddim".into()),
            ..request("e")
        };
        let candidates = vec![
            candidate(&a, 5),
            candidate(&wide, 5),
            candidate(&b, 5),
            candidate(&no_guidance, 5),
            candidate(&other_sampler, 5),
            candidate(&a, 5),
        ];
        assert_eq!(plan(&candidates, CAPS), vec![0, 2, 5]);
        // the next round: what was left, the earliest first
        let left = vec![candidates[1].clone(), candidates[3].clone(), candidates[4].clone()];
        assert_eq!(plan(&left, CAPS), vec![0]);
    }

    #[test]
    fn the_highest_priority_leads_and_joins_first() {
        let candidates = vec![
            candidate(&request("low"), 1),
            candidate(&request("high"), 9),
            candidate(&request("mid"), 5),
            candidate(&request("mid too"), 5),
        ];
        assert_eq!(plan(&candidates, CAPS), vec![1, 2, 3, 0]);
        let two = BatchCaps { jobs: 2, ..CAPS };
        assert_eq!(plan(&candidates, two), vec![1, 2]);
        let one = BatchCaps { jobs: 1, ..CAPS };
        assert_eq!(plan(&candidates, one), vec![1], "1 is one job at a time");
    }

    #[test]
    fn images_per_rank_cap_the_batch_but_never_the_lead() {
        let many = JobRequest {
            num_images: Some(16),
            ..request("many")
        };
        let three = JobRequest {
            num_images: Some(3),
            ..request("three")
        };
        // two ranks: 16 images are 8 each, 3 are [2, 1], the default one per rank
        let candidates = vec![
            candidate(&three, 5),
            candidate(&many, 5),
            candidate(&three, 5),
            candidate(&request("default"), 5),
            candidate(&three, 5),
        ];
        let caps = BatchCaps {
            jobs: 8,
            images_per_rank: 5,
        };
        // [2,1] + [2,1] = [4,2]; + [1,1] = [5,3]; another [2,1] would be 7 on rank 0
        assert_eq!(plan(&candidates, caps), vec![0, 2, 3]);
        assert_eq!(
            plan(&candidates[1..], caps),
            vec![0],
            "over the cap alone, it runs alone"
        );
    }

    #[test]
    fn two_deliveries_of_one_job_never_share_a_batch() {
        let twice = payload(&request("published twice"));
        let candidates = vec![
            Candidate::of(&twice, 5, 2),
            candidate(&request("other"), 5),
            Candidate::of(&twice, 5, 2),
        ];
        assert_eq!(plan(&candidates, CAPS), vec![0, 1]);
        assert_eq!(plan(&candidates[2..], CAPS), vec![0], "the copy runs after, alone");
    }

    #[test]
    fn loras_batch_only_when_equal_and_poison_runs_alone() {
        let lora = |scale| JobRequest {
            loras: Some(vec![LoraRequest {
                name: "pixel".into(),
                scale: Some(scale),
                sha256: Some("ab".repeat(32)),
            }]),
            ..request("l")
        };
        let poison = Candidate::of(b"not json", 5, 2);
        assert_eq!(poison.key, None);
        let candidates = vec![
            candidate(&lora(0.8), 5),
            candidate(&lora(0.5), 5),
            candidate(&request("none"), 5),
            poison.clone(),
            candidate(&lora(0.8), 5),
        ];
        assert_eq!(plan(&candidates, CAPS), vec![0, 4]);
        assert_eq!(plan(&[poison, candidates[2].clone()], CAPS), vec![0]);
        assert!(plan(&[], CAPS).is_empty());
    }

    #[test]
    fn img2img_batches_only_with_the_same_strength() {
        use common::rules::{ImageInput, StoredImage};
        let image = |strength| JobRequest {
            image: Some(ImageInput::Stored(StoredImage {
                key: "jobs/x/input.png".into(),
                width: 512,
                height: 512,
            })),
            strength: Some(strength),
            ..request("i")
        };
        let (a, b, c) = (image(0.6), image(0.75), image(0.6));
        let keys: Vec<_> = [&a, &b, &c]
            .iter()
            .map(|r| batch_key(&validate(r, || 1).unwrap()))
            .collect();
        assert_eq!(keys[0].start, StartKind::Image);
        assert_eq!(keys[0], keys[2]);
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], batch_key(&validate(&request("t"), || 1).unwrap()));
    }
}
