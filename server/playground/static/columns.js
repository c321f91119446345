// One column per level: its caption streamed in, then its latency and the alignment telemetry; once every
// column has settled, the object words that not every caption names are marked.
import { PlaygroundError, streamCaption } from './api.js';
import { presetName } from './levels.js';
import { differences, renderMarked } from './objects.js';

export function makeColumn(level) {
  const article = document.getElementById('column-template').content.firstElementChild.cloneNode(true);
  article.dataset.level = String(level);
  const name = presetName(level);
  article.querySelector('.level-title').textContent = name ? `c = ${level} · ${name}` : `c = ${level}`;
  return { level, article, text: '', el: (selector) => article.querySelector(selector) };
}

function addFact(column, term, value) {
  const dt = document.createElement('dt');
  dt.textContent = term;
  const dd = document.createElement('dd');
  dd.textContent = value;
  column.el('.facts').append(dt, dd);
}

export function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

/** What went wrong, for a person: the server's error in plain words, the page's deadline, or Stop. */
export function failureMessage(err, timeoutS) {
  if (err instanceof PlaygroundError) return err.message;
  if (err?.name === 'TimeoutError') return `No answer after ${timeoutS} s, so the page stopped waiting. Try again later.`;
  if (err?.name === 'AbortError' || err === 'stopped') return 'Stopped.';
  return `Something went wrong in the page: ${err?.message ?? err}`;
}
/** One column's caption, streamed into it. Resolves to the error (null when it succeeded); never rejects. */
export async function captionInto(column, request) {
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

/**
 * Mark, in each finished caption, the objects some other finished caption does not name, and (for a sample
 * scene, whose objects `truth` lists) those the scene does not contain.
 */
export function markDifferences(columns, vocabulary, truth) {
  const done = columns.filter((c) => c.article.dataset.state === 'done');
  const mentions = done.map((c) => vocabulary.find(c.text));
  const missing = differences(mentions);
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
