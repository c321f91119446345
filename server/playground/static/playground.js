// The playground page: pick an image, caption it at several conservativeness levels at once (each column
// streams on its own, so a slow or failed one never holds up the rest), then mark the object words that differ.
import { getJSON, PlaygroundError, streamCaption } from './api.js';
import { readImageFile, sampleImage } from './images.js';
import { differences, renderMarked, Vocabulary } from './objects.js';

const MAX_LEVELS = 5;
const KEY_STORAGE = 'sevi-playground-api-key'; // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);

const state = {
  config: null,
  vocabulary: null,
  image: null, // {dataUri, name, truth: string[] | null (a sample scene's objects), sample: file name | null}
  loading: Promise.resolve(), // the image being read: Compare waits for it rather than captioning the old one
  run: null, // {controller} of the comparison in flight
  nextLevelId: 1,
};

// ------------------------------------------------------------------------------------------ messages
function showAlert(message) {
  $('alert').textContent = message;
  $('alert').hidden = false;
}

function clearAlert() {
  $('alert').hidden = true;
  $('alert').textContent = '';
}

function setStatus(message) {
  $('status').textContent = message;
}

// -------------------------------------------------------------------------------------------- image
function showImage(image, previewable) {
  state.image = image;
  const preview = $('preview');
  preview.hidden = !previewable;
  if (previewable) {
    preview.src = image.dataUri;
    preview.alt = `The image to caption: ${image.name}`;
  }
  $('image-name').textContent = previewable ? image.name : `${image.name}: this browser cannot show it as an image.`;
  $('drop-hint').textContent = 'Drop another image, paste one, or';
  $('truth-legend').hidden = !image.truth;
  for (const button of document.querySelectorAll('.sample')) {
    button.setAttribute('aria-pressed', String(button.dataset.file === image.sample));
  }
}

function takeFile(file) {
  state.loading = readFile(file);
}

// A file that cannot be used also drops the image before it: Compare must not caption that one instead.
function forgetImage(message) {
  state.image = null;
  $('preview').hidden = true;
  $('image-name').textContent = '';
  showAlert(message);
}

async function readFile(file) {
  clearAlert();
  if (!file) return;
  if (file.size > state.config.max_image_bytes) {
    const mb = (state.config.max_image_bytes / (1024 * 1024)).toFixed(2);
    forgetImage(`${file.name} is too large: this server takes images of at most ${mb} MB.`);
    return;
  }
  try {
    const { dataUri, isImage } = await readImageFile(file);
    showImage({ dataUri, name: file.name, truth: null, sample: null }, isImage);
  } catch (err) {
    forgetImage(`Could not read ${file.name}: ${err.message}`);
  }
}

function setUpImageInput() {
  $('image-input').addEventListener('change', (e) => takeFile(e.target.files[0]));
  const zone = $('drop-zone');
  zone.addEventListener('dragover', (e) => {
    e.preventDefault();
    zone.classList.add('dragging');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('dragging'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('dragging');
    takeFile(e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => {
    const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith('image/'));
    if (file) takeFile(file);
  });
}

async function setUpSamples() {
  let samples;
  try {
    samples = await getJSON('playground/assets/samples/samples.json');
  } catch {
    return; // the page works without them
  }
  const list = $('sample-list');
  for (const sample of samples) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'sample';
    button.dataset.file = sample.file;
    button.setAttribute('aria-pressed', 'false');
    const img = document.createElement('img');
    img.src = `playground/assets/samples/${sample.file}`;
    img.alt = '';
    const label = document.createElement('span');
    label.textContent = sample.label;
    button.append(img, label);
    button.addEventListener('click', () => {
      clearAlert();
      state.loading = sampleImage(`playground/assets/samples/${sample.file}`).then((dataUri) => {
        const name = `${sample.label} (${sample.objects.join(', ')})`;
        showImage({ dataUri, name, truth: sample.objects, sample: sample.file }, true);
      }, (err) => showAlert(`Could not load the sample: ${err.message}`));
    });
    list.append(button);
  }
  $('samples').hidden = samples.length === 0;
}

// ------------------------------------------------------------------------------------------- levels
function presetName(level) {
  const found = Object.entries(state.config.presets).find(([, value]) => value === level);
  return found ? found[0][0].toUpperCase() + found[0].slice(1) : null;
}

function addLevel(value) {
  const list = $('levels');
  if (list.children.length >= MAX_LEVELS) return;
  const id = state.nextLevelId++;
  const item = document.createElement('li');
  item.className = 'level';
  const label = document.createElement('label');
  label.htmlFor = `level-${id}`;
  const input = document.createElement('input');
  Object.assign(input, { id: `level-${id}`, type: 'number', min: '0', max: '1', step: '0.05', value: String(value) });
  input.inputMode = 'decimal';
  const presetLabel = document.createElement('label');
  presetLabel.htmlFor = `preset-${id}`;
  presetLabel.className = 'visually-hidden';
  const select = document.createElement('select');
  select.id = `preset-${id}`;
  select.append(new Option('custom', ''));
  for (const level of Object.values(state.config.presets)) {
    select.append(new Option(presetName(level), String(level)));
  }
  const syncPreset = () => {
    select.value = presetName(Number(input.value)) !== null && input.value !== '' ? String(Number(input.value)) : '';
  };
  select.addEventListener('change', () => {
    if (select.value !== '') input.value = select.value;
  });
  input.addEventListener('input', syncPreset);
  const remove = document.createElement('button');
  remove.type = 'button';
  remove.className = 'remove';
  remove.textContent = '×';
  remove.addEventListener('click', () => {
    const next = item.nextElementSibling?.querySelector('input') ?? item.previousElementSibling?.querySelector('input');
    item.remove();
    renumberLevels();
    next?.focus(); // keep keyboard focus in the list rather than dropping it on <body>
  });
  item.append(label, input, presetLabel, select, remove);
  list.append(item);
  syncPreset();
  renumberLevels();
}

function renumberLevels() {
  const items = [...$('levels').children];
  items.forEach((item, i) => {
    const [label, , presetLabel, , remove] = item.children;
    label.textContent = `Level ${i + 1}`;
    presetLabel.textContent = `Preset for level ${i + 1}`;
    remove.setAttribute('aria-label', `Remove level ${i + 1}`);
    remove.title = `Remove level ${i + 1}`;
    remove.disabled = items.length === 1;
  });
  $('add-level').disabled = items.length >= MAX_LEVELS;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

/** The levels to caption at, or null after telling what is wrong (focus on the field). */
function readLevels() {
  if (mode() === 'single') return [Number($('slider').value)];
  const levels = [];
  for (const input of $('levels').querySelectorAll('input')) {
    const value = input.value === '' ? NaN : Number(input.value);
    if (!(value >= 0 && value <= 1)) {
      showAlert(`${input.labels[0].textContent} must be a number from 0 to 1.`);
      input.focus();
      return null;
    }
    levels.push(value);
  }
  return levels;
}

function setUpLevels() {
  for (const level of state.config.default_levels) addLevel(level);
  $('add-level').addEventListener('click', () => {
    addLevel(state.config.presets.balanced ?? 0.5);
    $('levels').lastElementChild.querySelector('input').focus();
  });
  const showValue = () => {
    const level = Number($('slider').value);
    const name = presetName(level);
    $('slider-value').textContent = name ? `${level} (${name})` : String(level);
  };
  $('slider').addEventListener('input', showValue);
  $('slider').addEventListener('change', () => {
    if (state.image) compare();
  });
  showValue();
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener('change', () => {
      const single = mode() === 'single';
      $('compare-levels').hidden = single;
      $('single-level').hidden = !single;
      $('run').textContent = single ? 'Caption' : 'Compare';
    });
  }
}

// ------------------------------------------------------------------------------------------ API key
function apiKey() {
  return $('api-key').value.trim();
}

function setUpKey() {
  $('key-section').hidden = !state.config.auth_required;
  $('api-key').value = sessionStorage.getItem(KEY_STORAGE) ?? '';
  $('api-key').addEventListener('input', () => sessionStorage.setItem(KEY_STORAGE, apiKey()));
  $('forget-key').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $('api-key').value = '';
    $('api-key').focus();
  });
}

function askForKey(message) {
  $('key-section').hidden = false;
  showAlert(message);
  $('api-key').focus();
}

// ------------------------------------------------------------------------------------------ columns
function levelTitle(level) {
  const name = presetName(level);
  return name ? `c = ${level} · ${name}` : `c = ${level}`;
}

function makeColumn(level) {
  const article = $('column-template').content.firstElementChild.cloneNode(true);
  article.dataset.level = String(level);
  article.querySelector('.level-title').textContent = levelTitle(level);
  return { level, article, text: '', el: (selector) => article.querySelector(selector) };
}

function addFact(column, term, value) {
  const dt = document.createElement('dt');
  dt.textContent = term;
  const dd = document.createElement('dd');
  dd.textContent = value;
  column.el('.facts').append(dt, dd);
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

function failureMessage(err, timeoutS) {
  if (err instanceof PlaygroundError) return err.message;
  if (err?.name === 'TimeoutError') return `No answer after ${timeoutS} s, so the page stopped waiting. Try again later.`;
  if (err?.name === 'AbortError' || err === 'stopped') return 'Stopped.';
  return `Something went wrong in the page: ${err?.message ?? err}`;
}

/** One column's caption, streamed into it. Resolves to the error (null when it succeeded); never rejects. */
async function captionInto(column, request) {
  const t0 = performance.now();
  let firstToken = null;
  column.article.dataset.state = 'streaming';
  column.article.setAttribute('aria-busy', 'true');
  column.el('.caption').textContent = '…';
  try {
    await streamCaption({ ...request, level: column.level }, {
      alignment(applied) {
        const contrast = applied.contrast ? 'on' : 'off';
        column.el('.knobs').textContent = `omega ${+applied.omega.toFixed(3)} · start layer ${applied.start_layer} · `
          + `kappa ${applied.kappa} · contrast ${contrast}`;
      },
      text(delta) {
        firstToken ??= performance.now();
        column.text += delta;
        column.el('.caption').textContent = column.text;
      },
      finish({ finishReason, telemetry }) {
        const total = performance.now() - t0;
        addFact(column, 'Latency', seconds(total));
        addFact(column, 'First words', seconds((firstToken ?? performance.now()) - t0));
        addFact(column, 'Rows aligned', String(telemetry.aligned_rows ?? 0));
        addFact(column, 'Heads re-weighted', String(telemetry.heads_reweighted ?? 0));
        addFact(column, 'Contrast steps', String(telemetry.contrast_steps ?? 0));
        addFact(column, 'Stage 1 / 2 rows', `${telemetry.stage1_rows ?? 0} / ${telemetry.stage2_rows ?? 0}`);
        column.finishReason = finishReason;
      },
      usage(usage) {
        addFact(column, 'Tokens', `${usage.completion_tokens}${column.finishReason === 'length' ? ' (the limit)' : ''}`);
      },
    });
    if (column.finishReason === undefined) {
      throw new PlaygroundError('The connection to the server closed before the caption was finished. Try again.');
    }
    column.el('.caption').textContent = column.text;
    column.article.dataset.state = 'done';
    return null;
  } catch (err) {
    column.article.dataset.state = 'error';
    column.el('.caption').textContent = column.text;
    column.el('.error').textContent = failureMessage(err, request.timeoutS);
    column.el('.error').hidden = false;
    return err;
  } finally {
    column.article.setAttribute('aria-busy', 'false');
  }
}

/** Mark, in each finished caption, the objects some other finished caption does not name. */
function markDifferences(columns) {
  const done = columns.filter((c) => c.article.dataset.state === 'done');
  const mentions = done.map((c) => state.vocabulary.find(c.text));
  const missing = differences(mentions);
  const truth = state.image?.truth ? new Set(state.image.truth) : null;
  done.forEach((column, i) => {
    renderMarked(column.el('.caption'), column.text, mentions[i], (category) => {
      const others = missing[i].get(category);
      const classes = [];
      const notes = [];
      if (others.length > 0) {
        classes.push('diff');
        notes.push(`${category}: not named at ${others.map((j) => `c = ${done[j].level}`).join(', ')}`);
      }
      if (truth && !truth.has(category)) {
        classes.push('not-in-image');
        notes.push(`${category}: not in the sample scene`);
      }
      return classes.length ? { className: classes.join(' '), title: notes.join('; ') } : null;
    });
    const only = [...missing[i]].filter(([, others]) => others.length > 0).map(([category]) => category);
    const named = [...missing[i].keys()];
    let summary = named.length ? `Objects: ${named.join(', ')}.` : 'No COCO objects named.';
    if (done.length > 1 && only.length) summary += ` Not in every caption: ${only.join(', ')}.`;
    if (truth) {
      const invented = named.filter((category) => !truth.has(category));
      if (invented.length) summary += ` Not in the scene: ${invented.join(', ')}.`;
    }
    column.el('.objects').textContent = summary;
  });
}

// -------------------------------------------------------------------------------------------- a run
function setRunning(running) {
  $('stop').disabled = !running;
  $('results').setAttribute('aria-busy', String(running));
}

async function compare() {
  await state.loading;
  clearAlert();
  const levels = readLevels();
  if (levels === null) return;
  if (!state.image) {
    showAlert('Choose an image first (or one of the sample scenes).');
    $('image-input').focus();
    return;
  }
  if (!$('key-section').hidden && !apiKey()) {
    askForKey('This server needs an API key: enter it in the API key field, then try again.');
    return;
  }
  const maxTokens = Number($('max-tokens').value);
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1 && maxTokens <= state.config.max_tokens_limit)) {
    showAlert(`Max tokens must be a whole number from 1 to ${state.config.max_tokens_limit}.`);
    $('max-tokens').focus();
    return;
  }
  state.run?.controller.abort('stopped'); // a new comparison replaces the one in flight
  const controller = new AbortController();
  const run = { controller };
  state.run = run;
  // The server has its own deadline; this one is for a server that stops answering altogether.
  const timeoutS = Math.ceil(state.config.request_timeout_s + 15);
  const request = {
    image: state.image.dataUri, prompt: $('prompt').value.trim() || state.config.default_prompt, maxTokens,
    apiKey: apiKey(), limits: state.config, timeoutS,
    signal: AbortSignal.any([controller.signal, AbortSignal.timeout(timeoutS * 1000)]),
  };
  const columns = levels.map(makeColumn);
  $('columns').replaceChildren(...columns.map((c) => c.article));
  $('columns').dataset.count = String(columns.length);
  setRunning(true);
  setStatus(`Captioning at ${levels.length} level${levels.length > 1 ? 's' : ''}…`);
  const t0 = performance.now();
  const errors = await Promise.all(columns.map((column) => captionInto(column, request)));
  if (state.run !== run) return; // replaced by a newer comparison: it owns the page now
  state.run = null;
  setRunning(false);
  markDifferences(columns);
  const failed = errors.filter((e) => e !== null);
  setStatus(`${columns.length - failed.length} of ${columns.length} caption${columns.length > 1 ? 's' : ''} in ${seconds(performance.now() - t0)}.`);
  if (failed.some((e) => e instanceof PlaygroundError && e.status === 401)) {
    askForKey(failed.find((e) => e.status === 401).message);
  } else if (failed.length && !failed.every((e) => e === 'stopped')) {
    const messages = [...new Set(failed.map((e) => failureMessage(e, timeoutS)))];
    showAlert(messages.join(' '));
  }
  // For tests and scripts: one more comparison has finished, its marks and messages included.
  document.body.dataset.runs = String(Number(document.body.dataset.runs ?? 0) + 1);
}

// ------------------------------------------------------------------------------------------- start
async function main() {
  try {
    const [config, vocabulary] = await Promise.all([getJSON('playground/config.json'), getJSON('playground/vocabulary.json')]);
    state.config = config;
    state.vocabulary = new Vocabulary(vocabulary.objects);
  } catch (err) {
    showAlert(`Could not load the page's settings from the server (${err.message}). Reload the page to try again.`);
    return;
  }
  $('model-line').textContent = `Model: ${state.config.model}`;
  $('prompt').value = state.config.default_prompt;
  $('max-tokens').value = String(state.config.default_max_tokens);
  $('max-tokens').max = String(state.config.max_tokens_limit);
  setUpImageInput();
  setUpLevels();
  setUpKey();
  $('controls').addEventListener('submit', (e) => {
    e.preventDefault();
    compare();
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      compare();
    }
  });
  $('stop').addEventListener('click', () => state.run?.controller.abort('stopped'));
  await setUpSamples();
  document.body.dataset.ready = 'true'; // for tests and scripts: the page is wired up
}

main();
