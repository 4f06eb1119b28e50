// A scheduled sale in a real headless Chromium: the pre-queue's countdown page, then at the
// start, without the visitor doing anything, the page comes back with the place the draw gave
// and goes in to the shop when the turn comes.
//
//   node tests/browser/sale.mjs http://127.0.0.1:PORT SECONDS_TO_THE_START
//
// The gate must guard /checkout, in front of the demo shop, with an event whose pre-queue is
// open and which starts SECONDS_TO_THE_START from now (max_active = 1 during it). Exits
// non-zero with a message on the first failed expectation.
import { run, step, timeout } from "./launch.mjs";

const [base, lead] = process.argv.slice(2);
if (!base || !lead) {
  console.error("usage: sale.mjs BASE_URL SECONDS_TO_THE_START");
  process.exit(2);
}

await run(async (browser) => {
  const visitor = async () => (await browser.newContext({ viewport: { width: 320, height: 640 } })).newPage();
  const first = await visitor();
  const second = await visitor();

  await first.goto(`${base}/checkout`);
  await second.goto(`${base}/checkout`);
  await second.getByRole("heading", { name: "The sale starts soon" }).waitFor({ timeout });
  // The countdown ticks from the seconds the server said, in the page and in the tab.
  const clock = () => second.evaluate(() => document.getElementById("starts").textContent.trim());
  const before = await clock();
  if (!/^\d+:\d\d$/.test(before)) throw new Error(`no countdown: "${before}"`);
  await second.waitForFunction((shown) => document.getElementById("starts").textContent.trim() !== shown, before,
    { timeout: 3_000 });
  const title = await second.title();
  if (!title.endsWith("Starting soon")) throw new Error(`the tab says "${title}"`);
  step(`both visitors are in the pre-queue, counting down (${before}, tab "${title}")`);

  // At the start the pages come back by themselves: one goes in (max_active 1), the other
  // is placed in line behind it.
  const deadline = { timeout: timeout + Number(lead) * 1000 };
  const inShop = (page) => page.getByRole("heading", { name: "Checkout" }).waitFor(deadline).then(() => page);
  const lucky = await Promise.race([inShop(first), inShop(second)]);
  const other = lucky === first ? second : first;
  step("at the start, the visitor the draw put first is handed over to the shop without doing anything");

  await other.getByRole("heading", { name: "You are in line" }).waitFor(deadline);
  const place = await other.evaluate(() => document.getElementById("position").textContent.trim());
  if (place !== "1") throw new Error(`the other visitor is at place ${place}, not 1`);
  step("the other visitor's page shows its drawn place, 1");

  await lucky.getByRole("button", { name: "Place order" }).click();
  await other.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });
  step("when the first one's order ends their session, the other goes in");
});
