"""
package.xml checks: ament_xmllint when it is installed, else a stand-in.

``ros2 pkg create`` generates a test that runs ament_xmllint, which runs
libxml2's ``xmllint --schema`` on every XML file against the schema named in
its ``<?xml-model?>`` instruction (for package.xml: REP 149's
package_format3.xsd). Where the ``ament_xmllint`` module can be imported,
``test_xmllint`` does just that and the stand-in tests below are skipped.

Here ament_xmllint cannot be installed (PyPI has no wheel of it), and neither
catkin_pkg nor ament_package ships the format 3 XSD, so the stand-in checks,
on package.xml only:

* it is well-formed XML (expat, through ``xml.dom.minidom``) and its
  ``<?xml-model?>`` instruction names the format 3 schema;
* the rules of package_format3.xsd that make up its structure, written out
  here from REP 149: ``format="3"`` on the root, the order and number of the
  child elements (name, version, description, maintainer+, license+, url*,
  author*, then the dependency tags, group_depend*, member_of_group*,
  export?), the attributes each element may carry, the name, version,
  e-mail, version-limit and condition patterns, the url ``type`` values and
  that no element with simple content has child elements;
* ``catkin_pkg.package.parse_package`` (what colcon and rosdep use) accepts
  it without errors or warnings: required tags, maintainer e-mails,
  non-empty licenses, no self-dependency, no redundant ``<depend>``;
* every dependency key is a well-formed rosdep key, is not a Python 2 key,
  is declared once per dependency type, and the linters that this test suite
  runs are test dependencies; the build type is ament_python.

What a real XSD validator checks beyond this: the ``xs:anyURI`` syntax of
``<url>`` and the whitespace normalisation of ``xs:token`` values in edge
cases. No other XML file of the package is checked.
"""

from pathlib import Path
import re
from xml.dom import minidom

from catkin_pkg.package import parse_package
import pytest

try:
    from ament_xmllint.main import main as ament_xmllint_main
except ImportError:  # not installable from PyPI: use the stand-in below
    ament_xmllint_main = None

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_XML = PACKAGE_ROOT / 'package.xml'
SCHEMA_URL = 'http://download.ros.org/schema/package_format3.xsd'
XML_SCHEMA_NS = 'http://www.w3.org/2001/XMLSchema'

stand_in = pytest.mark.skipif(
    ament_xmllint_main is not None,
    reason='ament_xmllint is installed: test_xmllint validates against the real XSD')

# package_format3.xsd and package_common.xsd (REP 149).
NAME_PATTERN = r'[a-z](_?[a-z0-9]+)*'
VERSION_PATTERN = r'(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)){2}'
VERSION_LIMIT_PATTERN = r'(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)){0,2}'
EMAIL_PATTERN = (r'[-a-zA-Z0-9_%+]+(\.[-a-zA-Z0-9_%+]+)*'
                 r'@[-a-zA-Z0-9%]+(\.[-a-zA-Z0-9%]+)*\.[a-zA-Z]{2,}')
DEPEND_CONDITION_PATTERN = r'[$A-Za-z0-9_\s<>!=()-]*'
GROUP_CONDITION_PATTERN = r'[$A-Za-z0-9_\s<>=]*'
URL_TYPES = ('website', 'bugtracker', 'repository')

DEPEND_TAGS = (
    'build_depend', 'build_export_depend', 'buildtool_depend',
    'buildtool_export_depend', 'exec_depend', 'depend', 'doc_depend',
    'test_depend', 'conflict', 'replace')

# The <package> content model: (tags, least, most) in order; None = unbounded.
SEQUENCE = (
    (('name',), 1, 1),
    (('version',), 1, 1),
    (('description',), 1, 1),
    (('maintainer',), 1, None),
    (('license',), 1, None),
    (('url',), 0, None),
    (('author',), 0, None),
    (DEPEND_TAGS, 0, None),
    (('group_depend',), 0, None),
    (('member_of_group',), 0, None),
    (('export',), 0, 1),
)

DEPEND_ATTRIBUTES = {
    'version_lt': VERSION_LIMIT_PATTERN,
    'version_lte': VERSION_LIMIT_PATTERN,
    'version_eq': VERSION_LIMIT_PATTERN,
    'version_gte': VERSION_LIMIT_PATTERN,
    'version_gt': VERSION_LIMIT_PATTERN,
    'condition': DEPEND_CONDITION_PATTERN,
}
# Allowed attributes per element: name -> pattern its value must match.
ATTRIBUTES = {
    'name': {},
    'version': {'compatibility': VERSION_LIMIT_PATTERN},
    'description': {},
    'maintainer': {'email': EMAIL_PATTERN},
    'license': {'file': r'.+'},
    'url': {'type': '|'.join(URL_TYPES)},
    'author': {'email': EMAIL_PATTERN},
    'group_depend': {'condition': GROUP_CONDITION_PATTERN},
    'member_of_group': {'condition': GROUP_CONDITION_PATTERN},
    'export': {},
    **{tag: DEPEND_ATTRIBUTES for tag in DEPEND_TAGS},
}
REQUIRED_ATTRIBUTES = {'maintainer': ('email',)}
# Elements whose content is a single token (simple content, no children).
TOKEN_CONTENT = ('name', 'version', 'maintainer', 'license', 'url', 'author',
                 'group_depend', 'member_of_group', *DEPEND_TAGS)

# A rosdep key or ROS package name: lower case, digits and . _ + -
ROSDEP_KEY_PATTERN = r'[a-z0-9][a-z0-9._+-]*'
# Test dependencies of the linter tests in this directory.
LINTER_TEST_DEPENDS = ('ament_flake8', 'ament_pep257', 'ament_xmllint', 'python3-pytest')


def _elements(node):
    return [n for n in node.childNodes if n.nodeType == n.ELEMENT_NODE]


def _token(node):
    text = ''.join(n.data for n in node.childNodes
                   if n.nodeType in (n.TEXT_NODE, n.CDATA_SECTION_NODE))
    return ' '.join(text.split())


def _package_element():
    document = minidom.parse(str(PACKAGE_XML))
    return document, document.documentElement


def _schema_errors(package):
    """Return the violations of package_format3.xsd's rules in <package>."""
    errors = []
    if package.tagName != 'package':
        return ['the root element is <%s>, not <package>' % package.tagName]
    for key, value in package.attributes.items():
        if key == 'format':
            if value != '3':
                errors.append('<package format="%s">: the format must be "3"' % value)
        elif not key.startswith(('xmlns', 'xsi:')):
            errors.append('<package> has the unknown attribute %s' % key)
    if not package.hasAttribute('format'):
        errors.append('<package> lacks the required attribute format="3"')

    children = _elements(package)
    position = 0
    for tags, least, most in SEQUENCE:
        count = 0
        while position < len(children) and children[position].tagName in tags:
            count += 1
            position += 1
        label = '/'.join('<%s>' % tag for tag in tags) if len(tags) < 3 else 'dependency tags'
        if count < least:
            errors.append('%s: %d found where it must occur at least %d time(s) at '
                          'this position' % (label, count, least))
        if most is not None and count > most:
            errors.append('%s: %d found, at most %d allowed' % (label, count, most))
    if position < len(children):  # like xmllint, report the first misplaced element
        errors.append('<%s> is not allowed at this position: the order is %s' % (
            children[position].tagName,
            ', '.join('/'.join(tags) if len(tags) < 3 else '<dependencies>'
                      for tags, _, _ in SEQUENCE)))

    for node in children:
        tag = node.tagName
        allowed = ATTRIBUTES.get(tag)
        if allowed is None:
            errors.append('<%s> is not an element of package format 3' % tag)
            continue
        for key, value in node.attributes.items():
            if key not in allowed:
                errors.append('<%s> has the unknown attribute %s' % (tag, key))
            elif not re.fullmatch(allowed[key], ' '.join(value.split())):
                errors.append('<%s %s="%s">: the value does not match %s' % (
                    tag, key, value, allowed[key]))
        for key in REQUIRED_ATTRIBUTES.get(tag, ()):
            if not node.hasAttribute(key):
                errors.append('<%s> lacks the required attribute %s' % (tag, key))
        if tag in TOKEN_CONTENT and _elements(node):
            errors.append('<%s> must not contain elements' % tag)
        if tag == 'name' and not re.fullmatch(NAME_PATTERN, _token(node)):
            errors.append('<name>%s</name> does not match %s' % (_token(node), NAME_PATTERN))
        if tag == 'version' and not re.fullmatch(VERSION_PATTERN, _token(node)):
            errors.append('<version>%s</version> does not match X.Y.Z without leading '
                          'zeros' % _token(node))
    return errors


@pytest.mark.linter
@pytest.mark.skipif(ament_xmllint_main is None,
                    reason='ament_xmllint is not installable here: see the stand-in tests')
def test_xmllint(monkeypatch):
    monkeypatch.chdir(PACKAGE_ROOT)
    rc = ament_xmllint_main(argv=[])
    assert rc == 0, 'Found errors'


@stand_in
@pytest.mark.linter
def test_package_xml_is_well_formed_and_names_the_format3_schema():
    document, package = _package_element()  # raises ExpatError when not well-formed
    assert package.tagName == 'package'
    models = [node.data for node in document.childNodes
              if node.nodeType == node.PROCESSING_INSTRUCTION_NODE
              and node.target == 'xml-model']
    assert len(models) == 1, 'expected one <?xml-model?> instruction, found %r' % models
    assert 'href="%s"' % SCHEMA_URL in models[0], models[0]
    assert 'schematypens="%s"' % XML_SCHEMA_NS in models[0], models[0]


@stand_in
@pytest.mark.linter
def test_package_xml_follows_the_format3_schema_rules():
    _, package = _package_element()
    errors = _schema_errors(package)
    assert not errors, 'package.xml breaks package_format3.xsd:\n' + '\n'.join(errors)


@stand_in
@pytest.mark.linter
def test_package_xml_is_accepted_by_catkin_pkg():
    warnings = []
    package = parse_package(str(PACKAGE_ROOT), warnings=warnings)
    assert not warnings, '\n'.join(warnings)
    assert package.package_format == 3
    assert package.get_build_type() == 'ament_python'


@stand_in
@pytest.mark.linter
def test_package_xml_dependency_keys():
    package = parse_package(str(PACKAGE_ROOT), warnings=[])
    errors = []
    dependencies = {
        'build_depend': package.build_depends,
        'build_export_depend': package.build_export_depends,
        'buildtool_depend': package.buildtool_depends,
        'buildtool_export_depend': package.buildtool_export_depends,
        'exec_depend': package.exec_depends,
        'doc_depend': package.doc_depends,
        'test_depend': package.test_depends,
        'conflict': package.conflicts,
        'replace': package.replaces,
    }
    for tag, depends in dependencies.items():
        names = [depend.name for depend in depends]
        for name in names:
            if not re.fullmatch(ROSDEP_KEY_PATTERN, name):
                errors.append('<%s>%s</%s>: not a rosdep key or ROS package name' % (
                    tag, name, tag))
            elif name.startswith('python-'):
                errors.append('<%s>%s</%s>: a Python 2 key, use python3-%s' % (
                    tag, name, tag, name[len('python-'):]))
        for name in sorted({name for name in names if names.count(name) > 1}):
            errors.append('<%s>%s</%s> is declared %d times' % (
                tag, name, tag, names.count(name)))
    test_depends = {depend.name for depend in package.test_depends}
    for name in LINTER_TEST_DEPENDS:
        if name not in test_depends:
            errors.append('<test_depend>%s</test_depend> is missing: test/ runs it' % name)
    assert not errors, '\n'.join(errors)
