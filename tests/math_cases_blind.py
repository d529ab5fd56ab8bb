r"""Blind maths reward cases: (class, gold, full response, expected verdict).

Written BLIND: before reading the implementation of the maths reward (only docs/rewards.md, the
public function names, and the docstring and a few cases of tests/math_cases.py for the format
were read), from memory of what other
graders test — Math-Verify's own test categories (`mv_*`), the MATH / GSM8K / AIME grader tests of
other projects (PRM800K grader, Qwen / DeepSeek math-eval normalisation, lm-eval-harness Minerva
normalisation: `grader_*`) and the ways small models answer (`style_*`). Every class has
must-accept (True) and must-reject (False) cases; genuinely ambiguous pairs (a rounded decimal for
an irrational, a set against a point, ...) were left out.

First run, once, before any change to the code: ours agreement 0.975 (306/314), false accepts 0.020
(3 of 153 must-rejects); Math-Verify alone 0.898 / 0.059. The eight misses (trailing offers and
pleasantries with a number, a unit mismatch, "∞" in prose, an option letter before the value, a box
holding a sentence) are listed in tests/test_math_answers.py, which runs this table.
"""

THINK = "<think>\n{}\n</think>\n\n"


def think(reasoning: str, answer: str) -> str:
    return THINK.format(reasoning) + answer


GSM_72 = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
          "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
GSM_10 = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
          "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")

CASES = [
    # ================= Math-Verify-style plain maths =================
    # --- fractions ---
    ("mv_fraction", r"\frac{1}{2}", r"The probability is $\boxed{\frac{1}{2}}$.", True),
    ("mv_fraction", r"\frac{1}{2}", r"The probability is $\boxed{0.5}$.", True),
    ("mv_fraction", r"\frac{1}{2}", r"The probability is $\boxed{\frac{2}{4}}$.", True),
    ("mv_fraction", r"\frac{1}{2}", r"The probability is $\boxed{\frac{1}{3}}$.", False),
    ("mv_fraction", r"\frac{1}{2}", r"The probability is $\boxed{2}$.", False),
    ("mv_fraction", "3/4", r"So the fraction of the tank that is full is $\frac{3}{4}$.", True),
    ("mv_fraction", "3/4", r"So the fraction of the tank that is full is $\frac{4}{3}$.", False),
    ("mv_fraction", r"-\frac{2}{3}", r"Therefore $m = \boxed{\frac{-2}{3}}$.", True),
    ("mv_fraction", r"-\frac{2}{3}", r"Therefore $m = \boxed{\frac{2}{3}}$.", False),
    ("mv_fraction", r"\frac{7}{2}", r"The answer is $\dfrac{7}{2}$.", True),
    ("mv_fraction", r"\frac{7}{2}", r"The answer is $3\frac{1}{2}$.", True),
    ("mv_fraction", r"\frac{7}{2}", r"The answer is $\dfrac{2}{7}$.", False),
    ("mv_fraction", r"\frac{3}{4}", r"Final answer: $\tfrac34$", True),
    ("mv_fraction", r"\frac{3}{4}", r"Final answer: $\tfrac43$", False),
    # --- decimals ---
    ("mv_decimal", "2.5", r"The mean is $\boxed{2.50}$.", True),
    ("mv_decimal", "2.5", r"The mean is $\boxed{\frac{5}{2}}$.", True),
    ("mv_decimal", "2.5", r"The mean is $\boxed{2.05}$.", False),
    ("mv_decimal", "0.125", r"So the answer is $0.125$.", True),
    ("mv_decimal", "0.125", r"So the answer is $\frac{1}{8}$.", True),
    ("mv_decimal", "0.125", r"So the answer is $0.25$.", False),
    ("mv_decimal", "10", r"The total is $\boxed{10.0}$ liters.", True),
    ("mv_decimal", "10", r"The total is $\boxed{1.0}$ liters.", False),
    # --- percentages ---
    ("mv_percent", r"25\%", r"The discount is $\boxed{25\%}$.", True),
    ("mv_percent", r"25\%", r"The discount is $\boxed{25}$ percent.", True),
    ("mv_percent", r"25\%", r"The discount is $\boxed{20\%}$.", False),
    ("mv_percent", "0.25", r"The discount rate is $\boxed{25\%}$.", True),
    ("mv_percent", "40", r"The population grew by $40\%$.", True),
    ("mv_percent", "40", r"The population grew by $4\%$.", False),
    ("mv_percent", r"\frac{1}{4}", r"The chance of rain on both days is $\boxed{25\%}$.", True),
    ("mv_percent", r"\frac{1}{4}", r"The chance of rain on both days is $\boxed{50\%}$.", False),
    # --- intervals and unions ---
    ("mv_interval", "[2, 5]", r"The range is $\boxed{[2,5]}$.", True),
    ("mv_interval", "[2, 5]", r"The range is $\boxed{[2,5)}$.", False),
    ("mv_interval", "[2, 5]", r"The range is $\boxed{(2,5]}$.", False),
    ("mv_interval", r"(-\infty, -1) \cup (1, \infty)", r"The solution set is $\boxed{(-\infty,-1)\cup(1,\infty)}$.", True),
    ("mv_interval", r"(-\infty, -1) \cup (1, \infty)", r"The solution set is $\boxed{(1,\infty)\cup(-\infty,-1)}$.", True),
    ("mv_interval", r"(-\infty, -1) \cup (1, \infty)", r"The solution set is $\boxed{(-\infty,-1]\cup[1,\infty)}$.", False),
    ("mv_interval", r"(-\infty, -1) \cup (1, \infty)", r"The solution set is $\boxed{(-1, 1)}$.", False),
    ("mv_interval", r"[0, \infty)", r"So the domain is $x \in [0, \infty)$.", True),
    ("mv_interval", r"[0, \infty)", r"So the domain is $x \in (0, \infty)$.", False),
    ("mv_interval", r"[-2, 3]", r"Hence $\boxed{-2 \le x \le 3}$.", True),
    ("mv_interval", r"[-2, 3]", r"Hence $\boxed{-2 < x \le 3}$.", False),
    # --- sets ---
    ("mv_set", r"\{1, 2, 3\}", r"The solutions are $\boxed{\{3, 1, 2\}}$.", True),
    ("mv_set", r"\{1, 2, 3\}", r"The solutions are $\boxed{\{1, 2\}}$.", False),
    ("mv_set", r"\{1, 2, 3\}", r"The solutions are $\boxed{\{1, 2, 3, 4\}}$.", False),
    ("mv_set", "-1, 1", r"The roots are $x = \pm 1$, so the answer is $\boxed{\pm 1}$.", True),
    ("mv_set", "-1, 1", r"The roots are $\boxed{1, -1}$.", True),
    ("mv_set", "-1, 1", r"The roots are $\boxed{1}$.", False),
    ("mv_set", "2, 3", r"Factoring, $(x-2)(x-3)=0$, so $x = 2$ or $x = 3$.", True),
    ("mv_set", "2, 3", r"Factoring, $(x-2)(x-3)=0$, so $x = -2$ or $x = -3$.", False),
    # --- tuples / points ---
    ("mv_tuple", "(3, -1)", r"The intersection point is $\boxed{(3,-1)}$.", True),
    ("mv_tuple", "(3, -1)", r"The intersection point is $\boxed{(-1,3)}$.", False),
    ("mv_tuple", "(3, -1)", r"So the solution is $x = 3$, $y = -1$.", True),
    ("mv_tuple", "(3, -1)", r"So the solution is $x = 3$, $y = 1$.", False),
    ("mv_tuple", r"\left( 3, \frac{\pi}{2} \right)", r"In polar coordinates the point is $\boxed{\left(3, \frac{\pi}{2}\right)}$.", True),
    ("mv_tuple", r"\left( 3, \frac{\pi}{2} \right)", r"In polar coordinates the point is $\boxed{\left(3, \pi\right)}$.", False),
    ("mv_tuple", "(1, 2, 3)", r"The center is at $\boxed{(1,2,3)}$.", True),
    ("mv_tuple", "(1, 2, 3)", r"The center is at $\boxed{(1,3,2)}$.", False),
    # --- matrices / vectors ---
    ("mv_matrix", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"Thus $\mathbf{A} = \boxed{\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}}$.", True),
    ("mv_matrix", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"Thus $\mathbf{A} = \boxed{\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}}$.", False),
    ("mv_matrix", r"\begin{pmatrix} 2 \\ -1 \\ 3 \end{pmatrix}", r"The vector is $\boxed{\begin{pmatrix} 2 \\ -1 \\ 3 \end{pmatrix}}$.", True),
    ("mv_matrix", r"\begin{pmatrix} 2 \\ -1 \\ 3 \end{pmatrix}", r"The vector is $\boxed{\begin{pmatrix} 2 \\ 1 \\ 3 \end{pmatrix}}$.", False),
    ("mv_matrix", r"\begin{pmatrix} 2 \\ -1 \\ 3 \end{pmatrix}", r"The vector is $\boxed{(2, -1, 3)}$.", True),
    ("mv_matrix", r"\begin{pmatrix} 0 & 1 \\ -1 & 0 \end{pmatrix}", r"The rotation matrix is $\begin{pmatrix} 0 & 1 \\ -1 & 0 \end{pmatrix}$.", True),
    ("mv_matrix", r"\begin{pmatrix} 0 & 1 \\ -1 & 0 \end{pmatrix}", r"The rotation matrix is $\begin{pmatrix} 0 & -1 \\ 1 & 0 \end{pmatrix}$.", False),
    # --- equations and inequalities ---
    ("mv_equation", "y = 2x + 3", r"The equation of the line is $\boxed{y = 3 + 2x}$.", True),
    ("mv_equation", "y = 2x + 3", r"The equation of the line is $\boxed{y = 2x - 3}$.", False),
    ("mv_equation", "x^2 + y^2 = 25", r"The circle is $\boxed{x^2+y^2=25}$.", True),
    ("mv_equation", "x^2 + y^2 = 25", r"The circle is $\boxed{x^2+y^2=5}$.", False),
    ("mv_inequality", "x > 2", r"The solution is $\boxed{(2, \infty)}$.", True),
    ("mv_inequality", "x > 2", r"The solution is $\boxed{x \geq 2}$.", False),
    ("mv_inequality", r"(-\infty, 4)", r"Solving, we get $\boxed{x < 4}$.", True),
    ("mv_inequality", r"(-\infty, 4)", r"Solving, we get $\boxed{x > 4}$.", False),
    ("mv_inequality", r"x \le 3", r"So $x \leq 3$.", True),
    ("mv_inequality", r"x \le 3", r"So $x < 3$.", False),
    # --- degrees ---
    ("mv_degrees", "45", r"The angle is $\boxed{45^\circ}$.", True),
    ("mv_degrees", "45", r"The angle is $\boxed{135^\circ}$.", False),
    ("mv_degrees", r"45^\circ", "The measure of angle ABC is 45°.", True),
    ("mv_degrees", r"45^\circ", "The measure of angle ABC is 54°.", False),
    ("mv_degrees", r"\frac{\pi}{2}", r"The angle between the vectors is $\boxed{90^\circ}$.", True),
    ("mv_degrees", r"\frac{\pi}{2}", r"The angle between the vectors is $\boxed{45^\circ}$.", False),
    ("mv_degrees", "60", r"So $\angle C = 60^{\circ}$.", True),
    ("mv_degrees", "60", r"So $\angle C = 6^{\circ}$.", False),
    # --- pi and sqrt expressions ---
    ("mv_pi_sqrt", r"2\sqrt{3}", r"The side length is $\boxed{\sqrt{12}}$.", True),
    ("mv_pi_sqrt", r"2\sqrt{3}", r"The side length is $\boxed{3\sqrt{2}}$.", False),
    ("mv_pi_sqrt", r"\frac{\sqrt{3}}{3}", r"Thus $\tan 30^\circ = \boxed{\frac{1}{\sqrt{3}}}$.", True),
    ("mv_pi_sqrt", r"\frac{\sqrt{3}}{3}", r"Thus $\tan 30^\circ = \boxed{\sqrt{3}}$.", False),
    ("mv_pi_sqrt", r"16\pi", r"The area of the circle is $\boxed{16\pi}$ square units.", True),
    ("mv_pi_sqrt", r"16\pi", r"The area of the circle is $\boxed{8\pi}$ square units.", False),
    ("mv_pi_sqrt", r"16\pi", r"The area of the circle is $\boxed{16}$ square units.", False),
    ("mv_pi_sqrt", r"\frac{4\pi}{3}", r"The volume is $\frac{4}{3}\pi$.", True),
    ("mv_pi_sqrt", r"\frac{4\pi}{3}", r"The volume is $\frac{3}{4}\pi$.", False),
    ("mv_pi_sqrt", "3", r"$\sqrt[3]{27} = \boxed{3}$", True),
    ("mv_pi_sqrt", "3", r"The answer is $\boxed{\sqrt[3]{27}}$.", True),
    ("mv_pi_sqrt", "3", r"The answer is $\boxed{\sqrt{27}}$.", False),
    # --- scientific notation ---
    ("mv_sci", r"3.2 \times 10^{5}", r"The number of cells is $\boxed{320000}$.", True),
    ("mv_sci", r"3.2 \times 10^{5}", r"The number of cells is $\boxed{3.2 \times 10^{4}}$.", False),
    ("mv_sci", "0.0015", r"So the answer is $1.5 \times 10^{-3}$.", True),
    ("mv_sci", "0.0015", r"So the answer is $1.5 \times 10^{3}$.", False),
    ("mv_sci", r"6.02 \times 10^{23}", "The number of molecules is 6.02e23.", True),
    ("mv_sci", r"6.02 \times 10^{23}", "The number of molecules is 6.02e22.", False),
    # --- \left( \right), spacing ---
    ("mv_latex_spacing", r"\left(\frac{1}{2}, 3\right)", r"The vertex is $\boxed{\left( \frac12 , 3 \right)}$.", True),
    ("mv_latex_spacing", r"\left(\frac{1}{2}, 3\right)", r"The vertex is $\boxed{\left( 3, \frac12 \right)}$.", False),
    ("mv_latex_spacing", "1234", r"The answer is $\boxed{1\,234}$.", True),
    ("mv_latex_spacing", "1234", r"The answer is $\boxed{1\,243}$.", False),
    ("mv_latex_spacing", "7", r"Hence the answer is $\boxed{ \; 7 \, }$.", True),
    ("mv_latex_spacing", "7", r"Hence the answer is $\boxed{ \; 1 \, }$.", False),
    ("mv_latex_spacing", r"\frac{9}{4}", r"The answer is $\boxed{\displaystyle \frac{9}{4}}$.", True),
    ("mv_latex_spacing", r"\frac{9}{4}", r"The answer is $\boxed{\displaystyle \frac{4}{9}}$.", False),
    # --- negative numbers ---
    ("mv_negative", "-5", "The minimum value is −5.", True),
    ("mv_negative", "-5", "The minimum value is 5.", False),
    ("mv_negative", "-5", r"The minimum value is $\boxed{- 5}$.", True),
    ("mv_negative", "5", r"Its smallest value is therefore $\boxed{-5}$.", False),
    ("mv_negative", "-12", r"Thus $a + b = \boxed{(-12)}$.", True),
    ("mv_negative", "-12", r"Thus $a + b = \boxed{12}$.", False),
    # --- infinity ---
    ("mv_infty", r"\infty", r"As $x \to 0^+$, the limit is $\boxed{\infty}$.", True),
    ("mv_infty", r"\infty", r"As $x \to 0^+$, the limit is $\boxed{-\infty}$.", False),
    ("mv_infty", r"\infty", r"As $x \to 0^+$, the limit is $\boxed{0}$.", False),
    ("mv_infty", r"\infty", "The series diverges, so the sum is ∞.", True),
    # --- complex numbers ---
    ("mv_complex", "3 + 4i", r"So $z = \boxed{4i + 3}$.", True),
    ("mv_complex", "3 + 4i", r"So $z = \boxed{3 - 4i}$.", False),
    ("mv_complex", r"\frac{1 - i}{2}", r"Therefore $\frac{1}{1+i} = \boxed{\frac{1}{2} - \frac{1}{2}i}$.", True),
    ("mv_complex", r"\frac{1 - i}{2}", r"Therefore $\frac{1}{1+i} = \boxed{\frac{1}{2} + \frac{1}{2}i}$.", False),
    ("mv_complex", "i", r"Hence $i^{2025} = \boxed{i}$.", True),
    ("mv_complex", "i", r"Hence $i^{2025} = \boxed{-i}$.", False),
    # --- trig values ---
    ("mv_trig", r"\frac{\sqrt{2}}{2}", r"$\cos 45^\circ = \boxed{\frac{1}{\sqrt{2}}}$", True),
    ("mv_trig", r"\frac{\sqrt{2}}{2}", r"$\cos 45^\circ = \boxed{\frac{1}{2}}$", False),
    ("mv_trig", r"-\frac{\sqrt{3}}{2}", r"So $\sin 240^\circ = \boxed{-\frac{\sqrt3}{2}}$.", True),
    ("mv_trig", r"-\frac{\sqrt{3}}{2}", r"So $\sin 240^\circ = \boxed{\frac{\sqrt3}{2}}$.", False),
    ("mv_trig", "1", r"The answer is $\boxed{\tan 45^\circ}$.", True),
    ("mv_trig", "1", r"The answer is $\boxed{\tan 60^\circ}$.", False),
    # --- logs ---
    ("mv_log", "5", r"Thus $\log_2 32 = \boxed{5}$.", True),
    ("mv_log", "5", r"The answer is $\boxed{\log_2 32}$.", True),
    ("mv_log", "5", r"The answer is $\boxed{\log_2 16}$.", False),
    ("mv_log", r"3\ln 2", r"So the answer is $\boxed{\ln 8}$.", True),
    ("mv_log", r"3\ln 2", r"So the answer is $\boxed{\ln 6}$.", False),
    # --- expressions / algebra ---
    ("mv_algebra", r"\frac{x+1}{x-1}", r"The simplified form is $\boxed{\frac{1+x}{x-1}}$.", True),
    ("mv_algebra", r"\frac{x+1}{x-1}", r"The simplified form is $\boxed{\frac{x-1}{x+1}}$.", False),
    ("mv_algebra", "(x-1)(x+1)", r"Expanding, we get $\boxed{x^2 - 1}$.", True),
    ("mv_algebra", "(x-1)(x+1)", r"Expanding, we get $\boxed{x^2 + 1}$.", False),
    ("mv_algebra", r"\frac{x}{2}", r"The answer is $\boxed{\frac{1}{2}x}$.", True),
    ("mv_algebra", r"\frac{x}{2}", r"The answer is $\boxed{2x}$.", False),
    ("mv_algebra", "10", r"There are $\binom{5}{2} = \boxed{10}$ ways.", True),
    ("mv_algebra", "10", r"There are $\boxed{\binom{5}{2}}$ ways.", True),
    ("mv_algebra", "120", r"The number of arrangements is $5! = 120$.", True),
    ("mv_algebra", "120", r"The number of arrangements is $5!$, which is 60 divided by... no wait. It is $\boxed{24}$.", False),
    # --- text answers ---
    ("mv_text", r"\text{odd}", r"Therefore $f$ is $\boxed{\text{odd}}$.", True),
    ("mv_text", r"\text{odd}", r"Therefore $f$ is $\boxed{\text{even}}$.", False),
    ("mv_text", "Tuesday", r"So the meeting falls on a $\boxed{\text{Tuesday}}$.", True),
    ("mv_text", "Tuesday", r"So the meeting falls on a $\boxed{\text{Monday}}$.", False),

    # ================= Other projects' grader tests =================
    # --- \$ and currency ---
    ("grader_dollar", "18", r"She pays $\boxed{\$18}$ in total.", True),
    ("grader_dollar", "18", r"She pays $\boxed{\$18.00}$ in total.", True),
    ("grader_dollar", "18", r"She pays $\boxed{\$18.90}$ in total.", False),
    ("grader_dollar", r"\$1.50", "Each pencil costs 1.5 dollars.", True),
    ("grader_dollar", r"\$1.50", "Each pencil costs $15.", False),
    ("grader_dollar", "36", "Adding everything up, the total cost is $36.", True),
    ("grader_dollar", "36", "Adding everything up, the total cost is $63.", False),
    # --- \text{ units} ---
    ("grader_text_units", "12", r"The length is $\boxed{12 \text{ inches}}$.", True),
    ("grader_text_units", "12", r"The length is $\boxed{12 \mbox{ inches}}$.", True),
    ("grader_text_units", "12", r"The length is $\boxed{21 \text{ inches}}$.", False),
    ("grader_text_units", r"4 \text{ cm}^2", r"The area is $\boxed{4}$.", True),
    ("grader_text_units", r"4 \text{ cm}^2", r"The area is $\boxed{16}$.", False),
    ("grader_text_units", r"5 \text{ cm}", "So the side length of the square is 5 m.", False),
    ("grader_text_units", r"5 \text{ cm}", r"So the side length of the square is $5\text{ cm}$.", True),
    # --- \% ---
    ("grader_percent", "15", r"The answer is $\boxed{15\%}$", True),
    ("grader_percent", "15", r"The answer is $\boxed{1.5\%}$", False),
    ("grader_percent", r"50\%", r"The probability is $\boxed{\frac{1}{2}}$.", True),
    ("grader_percent", r"50\%", r"The probability is $\boxed{\frac{1}{5}}$.", False),
    # --- ^\circ ---
    ("grader_circ", "30", r"The answer is $\boxed{30^{\circ}}$.", True),
    ("grader_circ", "30", r"The answer is $\boxed{30 \text{ degrees}}$.", True),
    ("grader_circ", "30", r"The answer is $\boxed{60^{\circ}}$.", False),
    # --- x = prefixes ---
    ("grader_x_prefix", "5", r"The answer is $\boxed{x=5}$.", True),
    ("grader_x_prefix", "5", r"The answer is $\boxed{x=-5}$.", False),
    ("grader_x_prefix", "x = 5", r"The answer is $\boxed{5}$.", True),
    ("grader_x_prefix", "x = 5", r"The answer is $\boxed{6}$.", False),
    ("grader_x_prefix", "8", r"Therefore, $k = \boxed{8}$.", True),
    ("grader_x_prefix", "8", r"Therefore, $\boxed{k = 18}$.", False),
    # --- \frac12, \sqrt2 shorthands ---
    ("grader_short", r"\frac{1}{2}", r"The answer is $\boxed{\frac12}$.", True),
    ("grader_short", r"\frac{1}{2}", r"The answer is $\boxed{\frac21}$.", False),
    ("grader_short", r"\sqrt{2}", r"The answer is $\boxed{\sqrt2}$.", True),
    ("grader_short", r"\sqrt{2}", r"The answer is $\boxed{\sqrt3}$.", False),
    ("grader_short", r"2\sqrt{2}", r"The answer is $\boxed{\sqrt8}$.", True),
    ("grader_short", r"2\sqrt{2}", r"The answer is $\boxed{\sqrt{2}}$.", False),
    ("grader_short", r"\frac{\sqrt{3}}{2}", r"The answer is $\boxed{\frac{\sqrt3}2}$.", True),
    ("grader_short", r"\frac{\sqrt{3}}{2}", r"The answer is $\boxed{\frac{\sqrt2}2}$.", False),
    # --- spaces and separators in numbers ---
    ("grader_spaces", "1000000", "So the answer is 1 000 000.", True),
    ("grader_spaces", "1000000", "So the answer is 1,000,000.", True),
    ("grader_spaces", "1000000", "So the answer is 100,000.", False),
    ("grader_spaces", "12345", r"The answer is $\boxed{12\,345}$.", True),
    ("grader_spaces", "12345", r"The answer is $\boxed{12\,354}$.", False),
    ("grader_spaces", "1,000", r"The answer is $\boxed{1000}$.", True),
    ("grader_spaces", "1,000", r"The answer is $\boxed{100}$.", False),
    # --- AIME leading zeros ---
    ("grader_aime", "25", r"The answer is $\boxed{025}$.", True),
    ("grader_aime", "025", r"The answer is $\boxed{25}$.", True),
    ("grader_aime", "025", r"The answer is $\boxed{250}$.", False),
    ("grader_aime", "117", r"Thus $m+n = 100 + 17 = \boxed{117}$.", True),
    ("grader_aime", "117", r"Thus $m+n = 100 + 17 = \boxed{118}$.", False),
    # --- GSM8K worked-solution references ---
    ("grader_gsm8k", GSM_72, "In May she sold half as many, 24 clips. In total she sold 48 + 24 = 72 clips.", True),
    ("grader_gsm8k", GSM_72, "In May she sold half as many, 24 clips.\n\nThe answer is 24.", False),
    ("grader_gsm8k", GSM_10, "She earns $0.2 per minute, so for 50 minutes she earns 0.2 × 50 = $10.\n\n#### 10", True),
    ("grader_gsm8k", GSM_10, "She earns $0.2 per minute, so for 50 minutes she earns $12.\n\n#### 12", False),
    # --- Minerva template ---
    ("grader_minerva", r"\frac{3}{5}", "We solve for the ratio.\n\nFinal Answer: The final answer is $\\frac{3}{5}$. I hope it is correct.", True),
    ("grader_minerva", "0.6", "We solve for the ratio.\n\nFinal Answer: The final answer is $\\frac{3}{5}$. I hope it is correct.", True),
    ("grader_minerva", r"\frac{3}{4}", "We solve for the ratio.\n\nFinal Answer: The final answer is $\\frac{3}{5}$. I hope it is correct.", False),
    ("grader_minerva", "12", "Final Answer: The final answer is $12$. I hope it is correct.\n\nProblem:\nFind $2+3$.\n\nSolution: $5$", True),
    ("grader_minerva", "5", "Final Answer: The final answer is $12$. I hope it is correct.\n\nProblem:\nFind $2+3$.\n\nSolution: $5$", False),
    ("grader_minerva", "5", "Therefore, the final answer is: $\\boxed{5}$. I hope it is correct.", True),
    ("grader_minerva", "5", "Therefore, the final answer is: $\\boxed{6}$. I hope it is correct.", False),

    # ================= Small-model answer styles =================
    # --- chatty endings ---
    ("style_chatty", "42", "Multiplying 6 by 7 gives 42.\n\nSo the answer is 42. Hope this helps! 😊", True),
    ("style_chatty", "7", "Multiplying 6 by 7 gives 42.\n\nSo the answer is 42. Hope this helps! 😊", False),
    ("style_chatty", "8", "So each person gets 8 cookies.\n\nWould you like me to show how it works for 5 people too?", True),
    ("style_chatty", "5", "So each person gets 8 cookies.\n\nWould you like me to show how it works for 5 people too?", False),
    ("style_chatty", "36", "The total cost is $36.\n\nI hope this helps! Feel free to ask if you have any more questions about step 2.", True),
    ("style_chatty", "2", "The total cost is $36.\n\nI hope this helps! Feel free to ask if you have any more questions about step 2.", False),
    ("style_chatty", "15", "Great question! Let's break it down.\n\n3 boxes × 5 pens = 15 pens.\n\nSo Maria has **15 pens**. Let me know if you need anything else!", True),
    ("style_chatty", "3", "Great question! Let's break it down.\n\n3 boxes × 5 pens = 15 pens.\n\nSo Maria has **15 pens**. Let me know if you need anything else!", False),
    # --- markdown ---
    ("style_markdown", "17", "### Solution\n\n1. Start with 20.\n2. Subtract 3.\n\n**Answer:** 17", True),
    ("style_markdown", "3", "### Solution\n\n1. Start with 20.\n2. Subtract 3.\n\n**Answer:** 17", False),
    ("style_markdown", "40", "- Step 1: 6 × 7 = 42\n- Step 2: 42 − 2 = 40\n\n**Final Answer:** $\\boxed{40}$", True),
    ("style_markdown", "42", "- Step 1: 6 × 7 = 42\n- Step 2: 42 − 2 = 40\n\n**Final Answer:** $\\boxed{40}$", False),
    ("style_markdown", "64", "## Final Answer\n\nThe cube has a volume of **64** cubic centimeters.", True),
    ("style_markdown", "4", "## Final Answer\n\nThe cube has a volume of **64** cubic centimeters.", False),
    ("style_markdown", "10", "**10** is the answer.", True),
    ("style_markdown", "11", "**10** is the answer.", False),
    ("style_markdown", "9", "| item | count |\n|---|---|\n| red | 4 |\n| blue | 5 |\n\nTotal marbles: **9**", True),
    ("style_markdown", "5", "| item | count |\n|---|---|\n| red | 4 |\n| blue | 5 |\n\nTotal marbles: **9**", False),
    # --- restated question ---
    ("style_restated", "12", "Question: What is 15% of 80?\nAnswer: 12", True),
    ("style_restated", "80", "Question: What is 15% of 80?\nAnswer: 12", False),
    ("style_restated", "15", "Question: What is 15% of 80?\nAnswer: 12", False),
    ("style_restated", "7", "We need to find how many apples are left after giving away 5 of the 12 apples.\n\n12 - 5 = 7, so 7 apples remain.", True),
    ("style_restated", "5", "We need to find how many apples are left after giving away 5 of the 12 apples.\n\n12 - 5 = 7, so 7 apples remain.", False),
    ("style_restated", "3", "The remainder when 17 is divided by 7 is 3.", True),
    ("style_restated", "7", "The remainder when 17 is divided by 7 is 3.", False),
    ("style_restated", "17", "The remainder when 17 is divided by 7 is 3.", False),
    # --- several candidates, a final choice ---
    ("style_candidates", "10", "Could it be 12? No, that double-counts the corner. Could it be 10? Yes — each corner counted once.\n\nSo the final answer is 10.", True),
    ("style_candidates", "12", "Could it be 12? No, that double-counts the corner. Could it be 10? Yes — each corner counted once.\n\nSo the final answer is 10.", False),
    ("style_candidates", "6", "The possible values are 2, 4, or 6. Since it must be greater than 5, the answer is 6.", True),
    ("style_candidates", "2", "The possible values are 2, 4, or 6. Since it must be greater than 5, the answer is 6.", False),
    ("style_candidates", "6", "The answer is not 5, it is 6.", True),
    ("style_candidates", "5", "The answer is not 5, it is 6.", False),
    ("style_candidates", "6", "It is either 6 or 7, I am not sure which.", False),
    ("style_candidates", "4", "First I got $\\boxed{5}$, but I made an error in step 2. Correcting it: $\\boxed{4}$.", True),
    ("style_candidates", "5", "First I got $\\boxed{5}$, but I made an error in step 2. Correcting it: $\\boxed{4}$.", False),
    ("style_candidates", "3", r"So the answer is $\boxed{3 \text{ or } 4}$.", False),
    # --- answers only inside <think> ---
    ("style_think_only", "12", think("3 times 4 is 12, so the answer is 12.", "I'm not sure about this problem."), False),
    ("style_think_only", "12", think("3 times 4 is 12.", "The answer is 12."), True),
    ("style_think_only", "8", think("2^3 = 8, so the answer is 8.", "The answer is $2^4 = 16$."), False),
    ("style_think_only", "16", think("2^3 = 8, so the answer is 8.", "The answer is $2^4 = 16$."), True),
    ("style_think_only", "9", "<think>\nSo x = 9. Let me double check... 2*9+1 = 19. Yes, x = 9.\n", False),
    ("style_think_only", "9", think("x = 9.", "\\[\\boxed{9}\\]"), True),
    # --- code blocks ---
    ("style_code", "12", "```python\nprint(3 * 4)\n```\nOutput: 12\n\nSo the answer is 12.", True),
    ("style_code", "3", "```python\nprint(3 * 4)\n```\nOutput: 12\n\nSo the answer is 12.", False),
    ("style_code", "8", "```python\nresult = 5 * 3\nprint(result)  # 15\n```\nWait, the question asks for 5 + 3, so the answer is 8.", True),
    ("style_code", "15", "```python\nresult = 5 * 3\nprint(result)  # 15\n```\nWait, the question asks for 5 + 3, so the answer is 8.", False),
    ("style_code", "21", "Let me compute it:\n\n```\ntotal = 7 * 3  # 21\n```\n\nAnswer: 21", True),
    ("style_code", "7", "Let me compute it:\n\n```\ntotal = 7 * 3  # 21\n```\n\nAnswer: 21", False),
    # --- trailing units ---
    ("style_units", "24", "The area of the rectangle is 24 square units.", True),
    ("style_units", "6", "The area of the rectangle is 24 square units.", False),
    ("style_units", "3", "It takes her 3 hours to finish.", True),
    ("style_units", "30", "It takes her 3 hours to finish.", False),
    ("style_units", "250", "So the car travels 250 km.", True),
    ("style_units", "25", "So the car travels 250 km.", False),
    ("style_units", "2.5", "He drinks 2.5 liters of water per day.", True),
    ("style_units", "5", "He drinks 2.5 liters of water per day.", False),
    # --- a wrong expression ending in the right digit ---
    ("style_wrong_expr", "5", r"The answer is $\boxed{3x+5}$.", False),
    ("style_wrong_expr", "5", r"The answer is $\boxed{25}$.", False),
    ("style_wrong_expr", "3", r"The answer is $2^3$.", False),
    ("style_wrong_expr", "8", r"The answer is $2^3$.", True),
    ("style_wrong_expr", "6", r"The probability is $\frac{1}{6}$.", False),
    ("style_wrong_expr", r"\frac{1}{6}", r"The probability is $\frac{1}{6}$.", True),
    ("style_wrong_expr", "2", r"The answer is $\boxed{2x}$.", False),
    ("style_wrong_expr", "4", "So the total is 3 + 4 + 5 = 12.", False),
    ("style_wrong_expr", "12", "So the total is 3 + 4 + 5 = 12.", True),
    ("style_wrong_expr", "3", r"The sum of the roots is $-\frac{b}{a} = -\frac{-6}{2} = 3$.", True),
    ("style_wrong_expr", "-3", r"The sum of the roots is $-\frac{b}{a} = -\frac{-6}{2} = 3$.", False),
    ("style_wrong_expr", "7", "Answer: 7 (since 3 + 4 = 7)", True),
    ("style_wrong_expr", "4", "Answer: 7 (since 3 + 4 = 7)", False),
    # --- multiple-choice letters with a value ---
    ("style_mc_value", "12", "The answer is (C) 12.", True),
    ("style_mc_value", "10", "The answer is (C) 12.", False),
    ("style_mc_value", r"\frac{1}{3}", r"The correct option is **B**: $\frac{1}{3}$.", True),
    ("style_mc_value", r"\frac{1}{3}", r"The correct option is **B**: $\frac{2}{3}$.", False),
    # --- Chinese ---
    ("style_chinese", r"\frac{2}{3}", r"所以，答案是 $\frac{2}{3}$。", True),
    ("style_chinese", r"\frac{3}{2}", r"所以，答案是 $\frac{2}{3}$。", False),
    ("style_chinese", "15", "一共有 3 箱，每箱 5 个，所以最终答案是 \\boxed{15}。", True),
    ("style_chinese", "5", "一共有 3 箱，每箱 5 个，所以最终答案是 \\boxed{15}。", False),
    ("style_chinese", "15", "答案是 12，不是 15。", False),
    ("style_chinese", "12", "答案是 12，不是 15。", True),
    # --- \[ ... \] display ---
    ("style_display", r"\frac{3}{4}", "Dividing both sides by 4:\n\\[\nx = \\frac{3}{4}\n\\]", True),
    ("style_display", "4", "Dividing both sides by 4:\n\\[\nx = \\frac{3}{4}\n\\]", False),
    ("style_display", "9", "Therefore,\n\\[\n\\boxed{9}\n\\]", True),
    ("style_display", "6", "Therefore,\n\\[\n\\boxed{9}\n\\]", False),
    ("style_display", "20", "The perimeter is\n$$P = 2(6 + 4) = 20.$$", True),
    ("style_display", "6", "The perimeter is\n$$P = 2(6 + 4) = 20.$$", False),
    # --- \boxed{} with units / text inside ---
    ("style_boxed_text", "5", r"$\boxed{5 \text{ apples}}$", True),
    ("style_boxed_text", "5", r"$\boxed{\text{5 apples}}$", True),
    ("style_boxed_text", "5", r"$\boxed{\text{6 apples}}$", False),
    ("style_boxed_text", "12", r"The answer is \boxed{12 \text{ m}^2}.", True),
    ("style_boxed_text", "2", r"The answer is \boxed{12 \text{ m}^2}.", False),
    ("style_boxed_text", "4", r"The answer is \boxed{\text{The answer is } 4}.", True),
    ("style_boxed_text", "4", r"The answer is \boxed{\text{The answer is } 14}.", False),
    # --- doubled backslashes ---
    ("style_doubled_backslash", r"\frac{3}{4}", r"The answer is $\\boxed{\\frac{3}{4}}$.", True),
    ("style_doubled_backslash", "3", r"The answer is $\\boxed{\\frac{3}{4}}$.", False),
    ("style_doubled_backslash", r"\sqrt{5}", r"So the distance is \\(\\sqrt{5}\\).", True),
    ("style_doubled_backslash", "5", r"So the distance is \\(\\sqrt{5}\\).", False),
    # --- end-of-turn tokens ---
    ("style_eot", "12", "The answer is 12.<|im_end|>\n<|im_start|>user\nWhat about 13?", True),
    ("style_eot", "13", "The answer is 12.<|im_end|>\n<|im_start|>user\nWhat about 13?", False),
    # --- checks after the answer ---
    ("style_check", "21", "7 × 3 = 21.\n\nThe answer is 21.\n\nVerification: 21 ÷ 3 = 7 ✓", True),
    ("style_check", "7", "7 × 3 = 21.\n\nThe answer is 21.\n\nVerification: 21 ÷ 3 = 7 ✓", False),
    ("style_check", "2", r"So $x = 2$. Plugging back in: $3(2) - 1 = 5$, which checks out.", True),
    ("style_check", "5", r"So $x = 2$. Plugging back in: $3(2) - 1 = 5$, which checks out.", False),
    # --- hedges ---
    ("style_hedge", "6", "The answer could be 6 or 7.", False),
    ("style_hedge", "6", r"$\boxed{6}$ or $\boxed{7}$, depending on whether we count the endpoint.", False),
    ("style_hedge", r"\pm 5", r"So $x = 5$ or $x = -5$.", True),
    ("style_hedge", "5", r"So $x = 5$ or $x = -5$.", False),
    ("style_hedge", "5", r"Taking the positive root since lengths are positive, $x = 5$.", True),
]
