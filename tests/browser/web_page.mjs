// Drives the dispatcher's web page in headless Chromium (Debian's, through
// playwright-core) for tests/tests/web_page.rs, which starts the services,
// a worker and the dispatcher, then checks what this prints.
//
//   node web_page.mjs SCENARIO BASE_URL OUT_DIR
//
// SCENARIO: `submit` (a job from the form: previews, the final grid and
// images, reuse seed, reopen from the server's recent jobs, cancel a running job),
// `img2img` (an uploaded image, a strength and a LoRA from the picker) or
// `bad-width`. Prints one JSON line of what the page showed on stdout; exits
// non-zero, with the reason on stderr, when the page did not get there.
// Screenshots go to OUT_DIR.

import { chromium } from 'playwright-core';

const [scenario, base, out] = process.argv.slice(2);
if (!scenario || !base || !out) {
  console.error('usage: node web_page.mjs submit|img2img|bad-width BASE_URL OUT_DIR');
  process.exit(2);
}
// The job of the `submit` scenario, chosen by the Rust test.
const PROMPT = process.env.WEB_PROMPT ?? 'a lighthouse on a cliff at dawn';
const SEED = process.env.WEB_SEED ?? '18446744073709551557';
const STEPS = process.env.WEB_STEPS ?? '8';
const PREVIEW_EVERY = process.env.WEB_PREVIEW_EVERY ?? '2';
const JOB_TIMEOUT = 120_000;

const text = (page, selector) => page.locator(selector).first().textContent();

// Limits come from GET /v1/limits: the form is ready once they are applied.
async function open(page, path = '/') {
  await page.goto(`${base}${path}`);
  await page.waitForFunction(() => document.querySelector('#f-width').min !== '');
}

async function waitGridLoaded(page) {
  await page.waitForFunction(
    () => {
      const grid = document.querySelector('#grid');
      const images = [...document.querySelectorAll('#images img')];
      return (
        !document.querySelector('#grid-box').hidden &&
        grid.complete &&
        grid.naturalWidth > 0 &&
        images.length > 0 &&
        images.every((img) => img.complete && img.naturalWidth > 0)
      );
    },
    null,
    { timeout: JOB_TIMEOUT },
  );
}

async function submit(page) {
  await open(page);
  await page.fill('#f-prompt', PROMPT);
  await page.fill('#f-width', '256');
  await page.fill('#f-height', '256');
  await page.fill('#f-num_inference_steps', STEPS);
  await page.fill('#f-preview_every', PREVIEW_EVERY);
  await page.fill('#f-seed', SEED);
  await page.click('#submit');

  // The live preview: a JPEG data URI from the SSE stream, while running
  // (what is on screen is read in the same tick the preview is seen).
  const seen = await page.waitForFunction(
    () => {
      const preview = document.querySelector('#preview');
      const shown = !document.querySelector('#preview-box').hidden;
      if (!shown || !preview.src.startsWith('data:image/jpeg;base64,')) return null;
      return {
        id: document.querySelector('#job-id').textContent,
        state: document.querySelector('#job').dataset.state,
        step: document.querySelector('#step').textContent,
        caption: document.querySelector('#preview-caption').textContent,
      };
    },
    null,
    { timeout: JOB_TIMEOUT, polling: 'raf' },
  );
  const previewWhileRunning = await seen.jsonValue();
  const id = previewWhileRunning.id.trim();
  await page.screenshot({ path: `${out}/preview.png` });

  // Then the final grid and every image, loaded from their presigned URLs.
  await waitGridLoaded(page);
  const final = await page.evaluate(() => ({
    state: document.querySelector('#job-state').textContent,
    step: document.querySelector('#step').textContent,
    previews: Number(document.querySelector('#job').dataset.previews),
    preview_box_hidden: document.querySelector('#preview-box').hidden,
    grid: {
      width: document.querySelector('#grid').naturalWidth,
      height: document.querySelector('#grid').naturalHeight,
      opens: document.querySelector('#grid-link').href,
    },
    images: [...document.querySelectorAll('#images li')].map((li) => ({
      seed: li.querySelector('.seed code').textContent,
      opens: li.querySelector('a').href,
      width: li.querySelector('img').naturalWidth,
    })),
    timings: [...document.querySelectorAll('#timings tbody tr')].map((tr) => tr.textContent),
  }));
  await page.locator('#grid').screenshot({ path: `${out}/grid.png` });
  await page.screenshot({ path: `${out}/web-ui.png`, fullPage: true });

  // "Reuse seed" puts the image's seed, every digit of it, into the form.
  await page.fill('#f-seed', '');
  await page.click('#images .reuse-seed');
  const reusedSeed = await page.inputValue('#f-seed');

  // A fresh page lists the job among the key's recent jobs, which come from
  // the server (GET /v1/jobs), not from this browser: its storage is
  // emptied first (the server is open: no key to keep). It reopens.
  await page.evaluate(() => localStorage.clear());
  await open(page);
  const recent = page.locator(`.recent-job[data-id="${id}"]`);
  const recentState = (await recent.locator('.state').textContent()).trim();
  await recent.click();
  await waitGridLoaded(page);
  const reopened = {
    id: (await text(page, '#job-id')).trim(),
    state: (await text(page, '#job-state')).trim(),
    hash: await page.evaluate(() => location.hash),
  };

  // Cancel a running job: a long one, stopped once it has made a step.
  await page.fill('#f-prompt', `${PROMPT}, cancelled`);
  await page.fill('#f-width', '256');
  await page.fill('#f-height', '256');
  await page.fill('#f-num_inference_steps', '100');
  await page.fill('#f-preview_every', '0');
  await page.fill('#f-seed', '');
  await page.click('#submit');
  await page.waitForFunction(
    (first) => {
      const shown = document.querySelector('#job-id').textContent;
      return shown !== first && document.querySelector('#progress').value >= 1;
    },
    id,
    { timeout: JOB_TIMEOUT },
  );
  const cancelId = (await text(page, '#job-id')).trim();
  await page.click('#cancel');
  await page.waitForSelector('#job[data-state="cancelled"]', { timeout: JOB_TIMEOUT });
  const cancelled = {
    id: cancelId,
    step: (await text(page, '#step')).trim(),
    cancel_button_hidden: await page.locator('#cancel').isHidden(),
  };

  return {
    id,
    preview_while_running: previewWhileRunning,
    final,
    reused_seed: reusedSeed,
    recent_state: recentState,
    reopened,
    cancelled,
  };
}

// img2img from an uploaded file, with a LoRA from the picker.
async function img2img(page) {
  await open(page);
  await page.waitForFunction(() => !document.querySelector('#add-lora').disabled);
  await page.fill('#f-prompt', PROMPT);
  await page.setInputFiles('#f-image', process.env.WEB_IMAGE);
  await page.waitForSelector('#image-thumb:not([hidden])');
  const caption = (await text(page, '#image-caption')).trim();
  await page.fill('#f-width', '256');
  await page.fill('#f-height', '256');
  await page.fill('#f-num_inference_steps', STEPS);
  await page.fill('#f-preview_every', '0');
  await page.fill('#f-strength', process.env.WEB_STRENGTH ?? '0.6');
  await page.fill('#f-seed', SEED);
  await page.click('#add-lora');
  await page.selectOption('#loras .lora-name', process.env.WEB_LORA);
  await page.fill('#loras .lora-scale', process.env.WEB_LORA_SCALE ?? '0.8');
  await page.click('#submit');
  await page.waitForFunction(() => document.querySelector('#job-id').textContent.trim() !== '', null, {
    timeout: JOB_TIMEOUT,
  });
  await waitGridLoaded(page);
  const id = (await text(page, '#job-id')).trim();
  await page.locator('#grid').screenshot({ path: `${out}/grid.png` });
  await page.screenshot({ path: `${out}/web-img2img.png`, fullPage: true });
  return {
    id,
    image_caption: caption,
    settings: (await text(page, '#job-settings')).trim(),
    state: (await text(page, '#job-state')).trim(),
    grid: await page.evaluate(() => ({
      width: document.querySelector('#grid').naturalWidth,
      height: document.querySelector('#grid').naturalHeight,
    })),
    lora_options: await page.evaluate(() => [...document.querySelectorAll('#loras .lora-name option')].map((o) => o.value)),
  };
}

async function badWidth(page) {
  await open(page);
  const widthInput = await page.evaluate(() => {
    const input = document.querySelector('#f-width');
    return { min: input.min, max: input.max, step: input.step, value: input.value };
  });
  const hint = (await text(page, '[data-hint="width"]')).trim();
  await page.fill('#f-prompt', 'a red bicycle');
  await page.fill('#f-width', '100');
  await page.click('#submit');
  await page.waitForSelector('#form-error:not([hidden])', { timeout: 30_000 });
  await page.screenshot({ path: `${out}/bad-width.png` });
  return {
    error: await text(page, '#form-error'),
    field_error: await text(page, '[data-error="width"]'),
    width_invalid: await page.getAttribute('#f-width', 'aria-invalid'),
    width_input: widthInput,
    width_hint: hint,
    job_shown: await page.locator('#job').isVisible(),
  };
}

const scenarios = { submit, img2img, 'bad-width': badWidth };
if (!scenarios[scenario]) {
  console.error(`unknown scenario ${scenario}`);
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
});
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: 'light' });
  context.setDefaultTimeout(60_000);
  const page = await context.newPage();
  // Uncaught exceptions of the page's script. (Console errors are only
  // logged: Chromium logs every 4xx answer there, the 422 expected too.)
  const pageErrors = [];
  const consoleErrors = [];
  page.on('pageerror', (error) => pageErrors.push(String(error)));
  page.on('console', (message) => {
    if (message.type() === 'error') consoleErrors.push(message.text());
  });
  let result;
  try {
    result = await scenarios[scenario](page);
  } catch (error) {
    await page.screenshot({ path: `${out}/failure.png` }).catch(() => {});
    const shown = await page
      .evaluate(() => document.querySelector('main')?.innerText ?? '')
      .catch(() => '');
    console.error(`${scenario}: ${error.stack ?? error}\n--- the page showed:\n${shown}\n--- page errors:\n${pageErrors.join('\n')}\n--- console errors:\n${consoleErrors.join('\n')}`);
    failed = true;
  }
  if (result) console.log(JSON.stringify({ ...result, page_errors: pageErrors, console_errors: consoleErrors }));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
