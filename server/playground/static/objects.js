// Object words in captions, read as the CHAIR scorer reads them (bench/chair.py), and what differs between
// captions. The server sends every surface form already mapped to its COCO category (plurals and two-word
// phrases included: server/playground/vocabulary.py), so this module only looks words up.

const WORD = /[a-z]+/g;

export class Vocabulary {
  /** @param {Record<string, string|null>} forms word or two-word phrase -> category (null: names no object) */
  constructor(forms) {
    this.forms = new Map(Object.entries(forms));
  }

  /**
   * Every object mention in `text`, in order: {start, end, category, surface}. A two-word phrase is tried
   * before its first word, as the scorer merges pairs ("hot dog" is not a dog, "train track" is no train).
   */
  find(text) {
    const words = [...text.toLowerCase().matchAll(WORD)].map((m) => ({ word: m[0], start: m.index, end: m.index + m[0].length }));
    const found = [];
    for (let i = 0; i < words.length; i += 1) {
      const pair = i + 1 < words.length ? `${words[i].word} ${words[i + 1].word}` : null;
      if (pair !== null && this.forms.has(pair)) {
        const category = this.forms.get(pair);
        if (category) found.push({ start: words[i].start, end: words[i + 1].end, category, surface: pair });
        i += 1;
      } else if (this.forms.get(words[i].word)) {
        found.push({ start: words[i].start, end: words[i].end, category: this.forms.get(words[i].word), surface: words[i].word });
      }
    }
    // The scorer's one sentence-level rule: "the seat of the toilet" is no chair.
    if (found.some((m) => m.category === 'toilet')) {
      return found.filter((m) => m.surface !== 'seat' && m.surface !== 'seats');
    }
    return found;
  }
}

/**
 * For each caption's mentions, category -> indexes of the other captions that do not name it. A category
 * every caption names maps to an empty list.
 * @param {Array<Array<{category: string}>>} mentionsPerCaption
 * @returns {Array<Map<string, number[]>>}
 */
export function differences(mentionsPerCaption) {
  const sets = mentionsPerCaption.map((mentions) => new Set(mentions.map((m) => m.category)));
  return sets.map((own, i) => new Map([...own].map((category) => [
    category, sets.flatMap((other, j) => (j !== i && !other.has(category) ? [j] : [])),
  ])));
}

/**
 * `text` as DOM nodes into `target`: plain text, with each mention whose category `marks(category)` returns
 * {className, title} for wrapped in a <mark>. Built node by node (never innerHTML): captions are model output.
 */
export function renderMarked(target, text, mentions, marks) {
  target.replaceChildren();
  let at = 0;
  for (const m of mentions) {
    const mark = marks(m.category);
    if (!mark) continue;
    target.append(document.createTextNode(text.slice(at, m.start)));
    const el = document.createElement('mark');
    el.className = mark.className;
    el.title = mark.title;
    el.dataset.category = m.category;
    el.textContent = text.slice(m.start, m.end);
    target.append(el);
    at = m.end;
  }
  target.append(document.createTextNode(text.slice(at)));
}
